import java.io.File;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.lang.reflect.Field;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;

import org.sdrs.CancelledException;
import org.sdrs.Image;
import org.sdrs.ProgressListener;
import org.sdrs.Request;
import org.sdrs.SdrsException;
import org.sdrs.StableDiffusion;

/**
 * The JNI library on a host JVM: java -Djava.library.path=target/release
 * --add-opens java.base/java.io=ALL-UNNAMED -cp CLASSES SdrsTest MODEL.gguf
 * (MODEL.gguf: any valid sdrs GGUF, for the file and file-descriptor paths).
 */
public class SdrsTest {
    interface Body {
        void run() throws Exception;
    }

    static int passed, failed;
    static final int THREADS = 2;
    static final byte[] PNG_SIGNATURE = {(byte) 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

    static void test(String name, Body body) {
        long t0 = System.nanoTime();
        try {
            body.run();
            passed++;
            System.out.printf("ok   %s (%.2f s)%n", name, (System.nanoTime() - t0) / 1e9);
        } catch (Throwable e) {
            failed++;
            System.out.printf("FAIL %s: %s%n", name, e);
            e.printStackTrace(System.out);
        }
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    /** Runs {@code body}, which must throw {@code type}; returns it. */
    static <T extends Throwable> T expect(Class<T> type, Body body) throws Exception {
        try {
            body.run();
        } catch (Throwable e) {
            if (type.isInstance(e)) {
                return type.cast(e);
            }
            throw new AssertionError("expected " + type.getSimpleName() + ", got " + e, e);
        }
        throw new AssertionError("expected " + type.getSimpleName() + ", nothing was thrown");
    }

    static void contains(String message, String part) {
        check(message != null && message.contains(part), "message `" + message + "` lacks `" + part + "`");
    }

    static Object hook(String name, Object... args) throws Exception {
        for (Method m : StableDiffusion.class.getDeclaredMethods()) {
            if (m.getName().equals(name)) {
                m.setAccessible(true);
                try {
                    return m.invoke(null, args);
                } catch (InvocationTargetException e) {
                    throw (Exception) e.getCause();
                }
            }
        }
        throw new NoSuchMethodException(name);
    }

    static int liveModels() throws Exception {
        return (Integer) hook("nativeLiveModels");
    }

    static Request small(StableDiffusion sd, String prompt) {
        Request r = sd.request(prompt);
        r.width = 64;
        r.height = 64;
        r.steps = 4;
        return r;
    }

    /** A long run, and the steps it reported, for the cancel and close races. */
    static class LongRun extends Thread {
        final StableDiffusion sd;
        final CountDownLatch firstStep = new CountDownLatch(1);
        final List<Integer> steps = new ArrayList<>();
        final AtomicReference<Throwable> thrown = new AtomicReference<>();
        volatile long endedNanos;
        final int total = 30;

        LongRun(StableDiffusion sd) {
            this.sd = sd;
        }

        @Override
        public void run() {
            Request r = sd.request("a large red circle in the center on a blue background");
            r.width = 256;
            r.height = 256;
            r.steps = total;
            try {
                sd.generate(r, (done, total) -> {
                    synchronized (steps) {
                        steps.add(done);
                    }
                    firstStep.countDown();
                });
            } catch (Throwable e) {
                thrown.set(e);
            }
            endedNanos = System.nanoTime();
        }

        int stepsDone() {
            synchronized (steps) {
                return steps.size();
            }
        }
    }

    static int fdOf(FileInputStream in) throws Exception {
        Field f = FileDescriptor.class.getDeclaredField("fd");
        f.setAccessible(true);
        return f.getInt(in.getFD());
    }

    public static void main(String[] args) throws Exception {
        long start = System.nanoTime();
        if (args.length != 1 || !new File(args[0]).isFile()) {
            System.out.println("usage: SdrsTest MODEL.gguf (a valid sdrs GGUF)");
            System.exit(2);
        }
        String gguf = args[0];
        File tmp = File.createTempFile("sdrs-test-", "");
        check(tmp.delete() && tmp.mkdir(), "temp folder");
        int baseline = liveModels();

        try (StableDiffusion sd = StableDiffusion.demo(THREADS)) {
            test("demo model: 64x64 image, ARGB and PNG, progress 1..total in order", () -> {
                List<int[]> calls = new ArrayList<>();
                Request r = small(sd, "a red circle on a blue background");
                Image image = sd.generate(r, (done, total) -> calls.add(new int[] {done, total}));
                check(image.width == 64 && image.height == 64, "size " + image.width + "x" + image.height);
                int[] argb = image.argb();
                check(argb.length == 64 * 64, "argb length " + argb.length);
                for (int p : argb) {
                    check((p >>> 24) == 0xFF, "opaque pixels");
                }
                byte[] png = image.png();
                check(png.length > PNG_SIGNATURE.length && Arrays.equals(Arrays.copyOf(png, 8), PNG_SIGNATURE), "PNG signature");
                check(calls.size() == 4, calls.size() + " progress calls for 4 steps");
                for (int i = 0; i < calls.size(); i++) {
                    check(calls.get(i)[0] == i + 1 && calls.get(i)[1] == 4, "call " + i + ": " + Arrays.toString(calls.get(i)));
                }
                contains(image.parameters, "a red circle on a blue background");
                contains(image.parameters, "Steps: 4");
                contains(image.parameters, "Size: 64x64");
                // The demo model draws a blue background: more blue than red in the pixels.
                long red = 0, blue = 0;
                for (int p : argb) {
                    red += (p >> 16) & 0xFF;
                    blue += p & 0xFF;
                }
                check(blue > red, "a blue background (blue " + blue + ", red " + red + ")");
            });

            test("defaults come from the model; same seed, same image; a null listener is fine", () -> {
                Request r = sd.request("a green square");
                check(r.width == 64 && r.height == 64, "demo size " + r.width + "x" + r.height);
                check(r.steps == 4 && "lcm".equals(r.sampler) && !Float.isNaN(r.cfgScale), "demo defaults: steps " + r.steps + ", " + r.sampler + ", cfg " + r.cfgScale);
                // Unset fields in a plain Request take the same defaults natively.
                Request plain = new Request("a green square");
                plain.seed = 7;
                r.seed = 7;
                Image a = sd.generate(plain, null);
                Image b = sd.generate(r, null);
                check(Arrays.equals(a.argb(), b.argb()), "same request, same pixels");
                r.seed = 8;
                check(!Arrays.equals(sd.generate(r, null).argb(), a.argb()), "another seed, another image");
            });

            test("cancel() from another thread stops a 30-step run within a step", () -> {
                LongRun run = new LongRun(sd);
                long t0 = System.nanoTime();
                run.start();
                check(run.firstStep.await(120, TimeUnit.SECONDS), "no first step");
                long firstStep = System.nanoTime() - t0;
                // Defaults and request checks do not wait for the run.
                long q0 = System.nanoTime();
                check(sd.request("x").steps == 4, "defaults during a run");
                Request bad = sd.request("x");
                bad.sampler = "nope";
                expect(SdrsException.class, () -> sd.generate(bad, null));
                check(System.nanoTime() - q0 < 1_000_000_000L, "request() or a bad request waited for the run");
                check(run.isAlive(), "the run ended before cancel()");
                sd.cancel();
                long cancelled = System.nanoTime();
                run.join(120_000);
                check(!run.isAlive(), "run still going");
                check(run.thrown.get() instanceof CancelledException, "thrown: " + run.thrown.get());
                int done = run.stepsDone();
                check(done < run.total / 2, done + " of " + run.total + " steps ran");
                System.out.printf("     first step after %.2f s, ended %.3f s after cancel(), %d of %d steps%n",
                        firstStep / 1e9, (run.endedNanos - cancelled) / 1e9, done, run.total);
                // A cancel affects only runs in progress.
                sd.cancel();
                check(sd.generate(small(sd, "a red circle"), null).width == 64, "a run after cancel");
            });

            test("a listener's exception stops the run and reaches the caller", () -> {
                RuntimeException boom = new IllegalArgumentException("boom");
                int[] calls = {0};
                ProgressListener l = (done, total) -> {
                    calls[0]++;
                    throw boom;
                };
                RuntimeException got = expect(RuntimeException.class, () -> sd.generate(small(sd, "a red circle"), l));
                check(got == boom, "got " + got);
                check(calls[0] == 1, calls[0] + " calls after the exception");
                check(sd.generate(small(sd, "a red circle"), null).width == 64, "usable afterwards");
            });

            test("bad size: the message says what the model allows", () -> {
                Request r = small(sd, "a circle");
                r.width = 65;
                SdrsException e = expect(SdrsException.class, () -> sd.generate(r, null));
                contains(e.getMessage(), "image size 65x64");
                contains(e.getMessage(), "multiples of 32");
                r.width = -64;
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "Request.width must be positive");
            });

            test("unknown sampler: named, with the valid ones", () -> {
                Request r = small(sd, "a circle");
                r.sampler = "nope";
                SdrsException e = expect(SdrsException.class, () -> sd.generate(r, null));
                contains(e.getMessage(), "unknown sampler `nope`");
                contains(e.getMessage(), "euler_a");
                // The other samplers run through the same path.
                r.sampler = "euler_a";
                r.steps = 2;
                check(sd.generate(r, null).width == 64, "euler_a");
            });

            test("A1111 and ComfyUI sampler names, a scheduler and the CUDA generator", () -> {
                Request r = small(sd, "a circle");
                r.sampler = "DPM++ 2M Karras";
                r.steps = 2;
                Image a = sd.generate(r, null);
                contains(a.parameters, "Sampler: DPM++ 2M, Schedule type: Karras");
                r.sampler = "dpmpp_2m";
                r.scheduler = "karras";
                check(Arrays.equals(sd.generate(r, null).argb(), a.argb()), "the same sampler and schedule by ComfyUI's names");
                r.rng = "cuda";
                Image cuda = sd.generate(r, null);
                contains(cuda.parameters, "RNG: NV");
                check(!Arrays.equals(cuda.argb(), a.argb()), "another generator, other noise");
                r.rng = "dice";
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "unknown rng `dice`");
            });

            test("prompts beyond Latin-1 keep their image and their text (UTF-8 iTXt)", () -> {
                String prompt = "a red circle \u2014 on a \u201cblue\u201d background \u732b \ud83d\udc08";
                Image image = sd.generate(small(sd, prompt), null);
                check(image.parameters.startsWith(prompt), "parameters keep the prompt: " + image.parameters);
                byte[] png = image.png();
                String raw = new String(png, java.nio.charset.StandardCharsets.UTF_8);
                check(raw.contains("iTXt") && raw.contains(prompt), "the PNG holds the prompt as UTF-8 text");
            });

            test("embeddings: a safetensors file's stem triggers it; a missing file is named", () -> {
                // A1111's safetensors layout: `emb_params`, one 64-wide vector (the demo's width).
                String header = "{\"emb_params\":{\"dtype\":\"F32\",\"shape\":[1,64],\"data_offsets\":[0,256]}}";
                java.nio.ByteBuffer b = java.nio.ByteBuffer.allocate(8 + header.length() + 256).order(java.nio.ByteOrder.LITTLE_ENDIAN);
                b.putLong(header.length()).put(header.getBytes("US-ASCII"));
                for (int i = 0; i < 64; i++) b.putFloat((i % 7 - 3) * 0.1f);
                File emb = new File(tmp, "shiny-x.safetensors");
                try (FileOutputStream out = new FileOutputStream(emb)) {
                    out.write(b.array());
                }
                Image before = sd.generate(small(sd, "a shiny-x circle"), null);
                check(sd.addEmbeddings(emb.getPath()) == 1, "one embedding");
                Image after = sd.generate(small(sd, "a shiny-x circle"), null);
                check(after.width == 64 && !Arrays.equals(after.argb(), before.argb()), "the trigger word now stands for the vector");
                contains(expect(SdrsException.class, () -> sd.addEmbeddings(tmp.getPath() + "/missing.pt")).getMessage(), "missing.pt");
            });

            test("clip skip and LoRA tags: in the parameters, or refused with the reason", () -> {
                Request r = small(sd, "a (red:1.2) circle");
                r.clipSkip = 2;
                contains(sd.generate(r, null).parameters, "Clip skip: 2");
                r.clipSkip = 7;
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "CLIP skip 7 is out of range");
                Request t = small(sd, "a circle <lora:mine:0.5>");
                contains(expect(SdrsException.class, () -> sd.generate(t, null)).getMessage(), "--lora-dir");
                t.loraDir = "/nonexistent-loras";
                contains(expect(SdrsException.class, () -> sd.generate(t, null)).getMessage(), "no LoRA `mine`");
            });

            test("VAE tiles: with the image's statistics the tiled decode is the whole one; a bad mode is refused", () -> {
                Request r = small(sd, "a red circle on a blue background");
                // Two 64-latent tiles across (the demo model's VAE downsamples by 8).
                r.width = 576;
                r.height = 512;
                r.steps = 1;
                int[] whole = sd.generate(r, null).argb();
                r.vaeTiling = true;
                r.vaeTileStats = "image";
                int[] tiled = sd.generate(r, null).argb();
                double se = 0;
                for (int i = 0; i < whole.length; i++) {
                    for (int shift = 0; shift < 24; shift += 8) {
                        double d = (((whole[i] >> shift) & 0xFF) - ((tiled[i] >> shift) & 0xFF)) / 255.0;
                        se += d * d;
                    }
                }
                double psnr = 10 * Math.log10(3.0 * whole.length / Math.max(se, 1e-12));
                System.out.printf("     tiled against whole decode: %.1f dB%n", psnr);
                check(psnr >= 40, "tiled against whole decode: " + psnr + " dB");
                r.vaeTileStats = "mine";
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "unknown vaeTileStats `mine`");
            });

            test("img2img and inpainting from ARGB ints; wrong pixel counts and a null prompt are refused", () -> {
                Image base = sd.generate(small(sd, "a red circle on a blue background"), null);
                int w = base.width, h = base.height;
                Request r = small(sd, "a yellow square on a green background");
                r.initImage = base.argb();
                r.strength = 0.6f;
                Image moved = sd.generate(r, null);
                check(moved.width == w && !Arrays.equals(moved.argb(), base.argb()), "img2img changes the picture");
                contains(moved.parameters, "Denoising strength: 0.6");
                // Inpainting the right half: the left half comes back pixel for pixel.
                r.maskImage = new int[w * h];
                for (int i = 0; i < w * h; i++) {
                    r.maskImage[i] = (i % w) >= w / 2 ? 0xFFFFFFFF : 0xFF000000;
                }
                r.strength = Float.NaN;
                int[] painted = sd.generate(r, null).argb(), original = base.argb();
                boolean changed = false;
                for (int i = 0; i < w * h; i++) {
                    if ((i % w) < w / 2) {
                        check(painted[i] == original[i], "an unmasked pixel changed");
                    } else {
                        changed |= painted[i] != original[i];
                    }
                }
                check(changed, "the masked half was repainted");
                r.initImage = new int[7];
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "Request.initImage has 7 pixels");
                r.initImage = null;
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "maskImage needs an initImage");
                r.maskImage = null;
                r.prompt = null;
                contains(expect(NullPointerException.class, () -> sd.generate(r, null)).getMessage(), "Request.prompt");
                expect(NullPointerException.class, () -> sd.generate(null, null));
            });

            test("a panic inside the library becomes an SdrsException", () -> {
                System.out.println("     (a deliberate panic: its report on stderr is expected)");
                SdrsException e = expect(SdrsException.class, () -> hook("nativePanicForTest", "deliberate"));
                contains(e.getMessage(), "internal error");
                contains(e.getMessage(), "deliberate");
                check(sd.generate(small(sd, "a red circle"), null).width == 64, "the JVM and the model carry on");
            });
        }

        test("missing file: the message names the path", () -> {
            String path = new File(tmp, "no-such-model.gguf").getPath();
            SdrsException e = expect(SdrsException.class, () -> StableDiffusion.load(path, THREADS));
            contains(e.getMessage(), path);
            contains(e.getMessage(), "No such file");
        });

        test("corrupt file: the message names the path and the problem", () -> {
            File bad = new File(tmp, "garbage.gguf");
            try (FileOutputStream out = new FileOutputStream(bad)) {
                byte[] junk = new byte[4096];
                new java.util.Random(1).nextBytes(junk);
                out.write(junk);
            }
            SdrsException e = expect(SdrsException.class, () -> StableDiffusion.load(bad.getPath(), THREADS));
            contains(e.getMessage(), bad.getPath());
            contains(e.getMessage(), "not a GGUF file");
            // The same through a file descriptor.
            try (FileInputStream in = new FileInputStream(bad)) {
                contains(expect(SdrsException.class, () -> StableDiffusion.fromFd(fdOf(in), THREADS)).getMessage(), "not a GGUF file");
            }
        });

        test("load(path) and fromFd(fd) of a real GGUF; the caller's fd may close at once", () -> {
            Image byPath;
            try (StableDiffusion sd = StableDiffusion.load(gguf, THREADS)) {
                Request r = small(sd, "a lighthouse");
                r.steps = 2;
                byPath = sd.generate(r, null);
            }
            StableDiffusion sd;
            try (FileInputStream in = new FileInputStream(gguf)) {
                sd = StableDiffusion.fromFd(fdOf(in), THREADS);
            }
            try {
                Request r = small(sd, "a lighthouse");
                r.steps = 2;
                Image byFd = sd.generate(r, null);
                check(Arrays.equals(byFd.argb(), byPath.argb()), "the same model either way");
            } finally {
                sd.close();
            }
            SdrsException e = expect(SdrsException.class, () -> StableDiffusion.fromFd(987654, THREADS));
            contains(e.getMessage(), "file descriptor 987654");
            contains(e.getMessage(), "Bad file descriptor");
        });

        test("close: twice is a no-op, any use after it throws IllegalStateException", () -> {
            StableDiffusion sd = StableDiffusion.demo(THREADS);
            Request r = small(sd, "a circle");
            check(liveModels() == baseline + 1, "one live model");
            sd.close();
            check(liveModels() == baseline, "freed by close");
            sd.close();
            check(liveModels() == baseline, "freed once");
            expect(IllegalStateException.class, () -> sd.generate(r, null));
            expect(IllegalStateException.class, sd::cancel);
            expect(IllegalStateException.class, () -> sd.request("x"));
        });

        test("close while generate runs on another thread, and from inside the listener", () -> {
            StableDiffusion sd = StableDiffusion.demo(THREADS);
            LongRun run = new LongRun(sd);
            run.start();
            check(run.firstStep.await(120, TimeUnit.SECONDS), "no first step");
            long t0 = System.nanoTime();
            sd.close();
            check(System.nanoTime() - t0 < 1_000_000_000L, "close() waited for the run");
            run.join(120_000);
            check(run.thrown.get() instanceof CancelledException, "thrown: " + run.thrown.get());
            check(run.stepsDone() < run.total / 2, run.stepsDone() + " steps ran");
            check(liveModels() == baseline, "freed after the run ended");
            expect(IllegalStateException.class, () -> sd.generate(new Request("x"), null));

            StableDiffusion inner = StableDiffusion.demo(THREADS);
            Request r = inner.request("a circle");
            r.width = r.height = 128;
            r.steps = 8;
            int[] calls = {0};
            expect(CancelledException.class, () -> inner.generate(r, (done, total) -> {
                calls[0]++;
                inner.close();
            }));
            check(calls[0] == 1, calls[0] + " steps after close");
            check(liveModels() == baseline, "freed when the listener's run returned");
        });

        test("stress: 6 threads on 3 models (two of one file) with cancels and a close; finished images equal those made alone", () -> {
            StableDiffusion[] models = {StableDiffusion.load(gguf, 1), StableDiffusion.load(gguf, 1), StableDiffusion.demo(1)};
            int seeds = 3;
            // The images each model makes alone, one seed at a time.
            int[][][] alone = new int[models.length][seeds][];
            for (int m = 0; m < models.length; m++) {
                for (int s = 0; s < seeds; s++) {
                    Request r = small(models[m], "a red circle");
                    r.seed = 100 + s;
                    alone[m][s] = models[m].generate(r, null).argb();
                }
            }
            check(Arrays.equals(alone[0][0], alone[1][0]), "two loads of one file, one image");
            List<Thread> threads = new ArrayList<>();
            AtomicReference<Throwable> failed = new AtomicReference<>();
            java.util.concurrent.atomic.AtomicInteger finished = new java.util.concurrent.atomic.AtomicInteger();
            java.util.concurrent.atomic.AtomicInteger cancelled = new java.util.concurrent.atomic.AtomicInteger();
            for (int t = 0; t < 6; t++) {
                final int id = t;
                threads.add(new Thread(() -> {
                    for (int i = 0; i < 4; i++) {
                        int m = (id + i) % models.length, s = (id * 7 + i) % seeds;
                        try {
                            Request r = small(models[m], "a red circle");
                            r.seed = 100 + s;
                            int[] argb = models[m].generate(r, null).argb();
                            if (!Arrays.equals(argb, alone[m][s])) {
                                failed.compareAndSet(null, new AssertionError("model " + m + " seed " + s + ": another image under load"));
                            }
                            finished.incrementAndGet();
                        } catch (CancelledException | IllegalStateException e) {
                            // cancel() hit this run, or model 2 was closed under it.
                            cancelled.incrementAndGet();
                        } catch (Throwable e) {
                            failed.compareAndSet(null, e);
                        }
                    }
                }));
            }
            // A seventh thread cancels model 0's runs now and then, and closes model 2.
            Thread meddler = new Thread(() -> {
                try {
                    for (int i = 0; i < 20; i++) {
                        Thread.sleep(15);
                        models[0].cancel();
                    }
                    models[2].close();
                } catch (Throwable e) {
                    failed.compareAndSet(null, e);
                }
            });
            threads.forEach(Thread::start);
            meddler.start();
            for (Thread t : threads) {
                t.join(300_000);
                check(!t.isAlive(), "a stress thread is stuck");
            }
            meddler.join();
            if (failed.get() != null) {
                throw new AssertionError("under stress: " + failed.get(), failed.get());
            }
            check(finished.get() + cancelled.get() == 24, finished.get() + " finished + " + cancelled.get() + " cancelled of 24");
            check(finished.get() > 0, "nothing finished");
            System.out.printf("     %d runs finished with the images made alone, %d cancelled or closed under them%n", finished.get(), cancelled.get());
            models[0].close();
            models[1].close();
            check(liveModels() == baseline, "every stressed model freed");
        });

        test("every model was freed", () -> check(liveModels() == baseline, liveModels() + " live models"));

        for (File f : tmp.listFiles()) {
            f.delete();
        }
        tmp.delete();
        System.out.printf("java %s, %.1f s%n", System.getProperty("java.version"), (System.nanoTime() - start) / 1e9);
        System.out.println(passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }
}
