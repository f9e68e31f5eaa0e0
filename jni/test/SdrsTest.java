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

import org.sdrs.Cancellation;
import org.sdrs.CancelledException;
import org.sdrs.Image;
import org.sdrs.Plan;
import org.sdrs.Progress;
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
        final Cancellation token;

        LongRun(StableDiffusion sd) {
            this(sd, null);
        }

        LongRun(StableDiffusion sd, Cancellation token) {
            this.sd = sd;
            this.token = token;
        }

        @Override
        public void run() {
            Request r = sd.request("a large red circle in the center on a blue background");
            r.width = 256;
            r.height = 256;
            r.steps = total;
            try {
                sd.generate(r, p -> {
                    if (p.stage == Progress.Stage.SAMPLING) {
                        synchronized (steps) {
                            steps.add(p.done);
                        }
                        firstStep.countDown();
                    }
                }, token);
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
                Image image = sd.generate(r, p -> {
                    if (p.stage == Progress.Stage.SAMPLING) {
                        calls.add(new int[] {p.done, p.total});
                    }
                });
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
                ProgressListener l = p -> {
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
                contains(expect(SdrsException.class, () -> sd.generate(r, null)).getMessage(), "Request.vaeTileStats: unknown vae tile stats `mine`; valid: tile, image");
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
                // Inpainting the right half: the left half comes back pixel for pixel (with
                // an unblurred mask; the default blur of 4 softens the seam).
                r.maskBlur = 0;
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

            test("the Request class has every option field the library reads, with its type, and nothing unread", () -> {
                String[] fields = (String[]) hook("nativeOptionFields");
                check(fields.length >= 25, fields.length + " option fields");
                java.util.Set<String> known = new java.util.HashSet<>(Arrays.asList(
                        "prompt", "seed", "width", "height", "initImage", "initWidth", "initHeight",
                        "maskImage", "maskWidth", "maskHeight", "maskBlur", "pad",
                        "controlNet", "controlImage", "controlWidth", "controlHeight", "controlStrength",
                        "controlStart", "controlEnd", "guessMode", "canny"));
                for (String f : fields) {
                    String name = f.substring(0, f.indexOf(':')), descriptor = f.substring(f.indexOf(':') + 1);
                    Field field = Request.class.getField(name);
                    String actual = field.getType().isArray() ? field.getType().getName().replace('.', '/')
                            : field.getType() == String.class ? "Ljava/lang/String;"
                            : String.valueOf(java.lang.reflect.Array.newInstance(field.getType(), 0).getClass().getName().charAt(1));
                    check(actual.equals(descriptor), name + " is " + actual + ", the library reads " + descriptor);
                    known.add(name);
                }
                for (Field f : Request.class.getFields()) {
                    check(known.contains(f.getName()), "Request." + f.getName() + " is read by nothing");
                }
            });

            test("request() fills the CLI's defaults where the model has none", () -> {
                Request r = sd.request("x");
                // The scheduler stays unset: its default follows the sampler's name.
                check(r.scheduler == null, "scheduler " + r.scheduler);
                check("torch".equals(r.rng) && "original".equals(r.emphasis) && "image".equals(r.vaeTileStats), r.rng + " " + r.emphasis + " " + r.vaeTileStats);
                check(r.clipSkip == 1 && r.guidanceRescale == 0f && r.maskBlur == 4f && r.aestheticScore == 6f, "numbers");
                check("".equals(r.negative), "negative");
                // A request filled in so runs as the unfilled one.
                Request plain = new Request("a red circle");
                plain.width = plain.height = 64;
                Request filled = sd.request("a red circle");
                filled.width = filled.height = 64;
                check(Arrays.equals(sd.generate(plain).argb(), sd.generate(filled).argb()), "filled defaults change nothing");
            });

            test("the CLI's options: preset, eta, emphasis, explicit LoRA files, a VAE file", () -> {
                // On a plain request: fields request() fills in would win over the preset.
                Request r = new Request("a (red:1.6) circle");
                r.preset = "sd-turbo";
                r.width = r.height = 64;
                Image turbo = sd.generate(r);
                contains(turbo.parameters, "Steps: 1,");
                contains(turbo.parameters, "Sampler: Euler a");
                contains(turbo.parameters, "Size: 64x64");
                r.emphasis = "none";
                Image plainText = sd.generate(r);
                contains(plainText.parameters, "Emphasis: None");
                check(!Arrays.equals(plainText.argb(), turbo.argb()), "emphasis none reads (red:1.6) as text");
                Request d = small(sd, "a circle");
                d.sampler = "ddim";
                d.eta = 1f;
                Image noisy = sd.generate(d);
                d.eta = 0f;
                check(!Arrays.equals(sd.generate(d).argb(), noisy.argb()), "eta changes DDIM's steps");
                d.eta = Float.NaN;
                d.guidanceRescale = 2f;
                contains(expect(SdrsException.class, () -> sd.generate(d)).getMessage(), "Request.guidanceRescale: must be in [0, 1]");
                d.guidanceRescale = Float.NaN;
                d.loras = new String[] {tmp.getPath() + "/missing-lora.safetensors:0.5"};
                contains(expect(SdrsException.class, () -> sd.generate(d)).getMessage(), "missing-lora.safetensors");
                d.loras = null;
                d.strength = 0.5f;
                contains(expect(SdrsException.class, () -> sd.generate(d)).getMessage(), "Request.strength: needs an init image");
                contains(expect(SdrsException.class, () -> sd.setVae(tmp.getPath() + "/no-vae.safetensors")).getMessage(), "no-vae.safetensors");
            });

            test("init pictures of any size are fitted as the CLI fits files; the mask is blurred by default", () -> {
                Image base = sd.generate(small(sd, "a red circle on a blue background"));
                // A 128x96 picture (the base, tiled): kept at its size without a request size...
                int[] big = new int[128 * 96];
                for (int y = 0; y < 96; y++) {
                    for (int x = 0; x < 128; x++) {
                        big[y * 128 + x] = base.argb()[(y % 64) * 64 + (x % 64)];
                    }
                }
                Request r = new Request("a yellow square").initImage(big, 128, 96);
                r.steps = 2;
                Image kept = sd.generate(r);
                check(kept.width == 128 && kept.height == 96, "kept " + kept.width + "x" + kept.height);
                // ...scaled to cover one given side, the other following its aspect ratio.
                r.width = 64;
                Image scaled = sd.generate(r);
                check(scaled.width == 64 && scaled.height == 64, "scaled " + scaled.width + "x" + scaled.height);
                // A 32x32 mask, stretched to the picture, blurred by 4 pixels unless told.
                int[] mask = new int[32 * 32];
                for (int i = 0; i < mask.length; i++) {
                    mask[i] = (i % 32) >= 16 ? 0xFFFFFFFF : 0xFF000000;
                }
                r.maskImage(mask, 32, 32);
                contains(sd.generate(r).parameters, "Mask blur: 4");
                r.maskBlur = 0;
                contains(sd.generate(r).parameters, "Mask blur: 0");
                r.pad = new int[] {32, 0, 0, 0};
                r.width = 0;
                Image padded = sd.generate(r);
                check(padded.width == 160 && padded.height == 96, "outpainted " + padded.width + "x" + padded.height);
                r.pad = new int[] {1, 2};
                contains(expect(SdrsException.class, () -> sd.generate(r)).getMessage(), "Request.pad must hold 4 values");
            });

            test("progress: stages in order, times, previews as ARGB every N steps", () -> {
                Request r = small(sd, "a red circle on a blue background");
                r.steps = 5;
                r.previewEvery = 2;
                List<Progress> seen = new ArrayList<>();
                Image image = sd.generate(r, seen::add);
                StringBuilder order = new StringBuilder();
                for (Progress p : seen) {
                    order.append(p.stage.name().charAt(0));
                    if (p.preview != null) {
                        order.append('p').append(p.done);
                        check(p.preview.length == p.previewWidth * p.previewHeight && p.previewWidth == 64 && p.previewHeight == 64, "preview size");
                        for (int px : p.preview) {
                            check((px >>> 24) == 0xFF, "opaque preview pixels");
                        }
                    }
                }
                // TEXT, five steps with previews after 2, 4 and the last, the decode, done.
                check(order.toString().equals("TSSSp2SSSp4SSp5DD"), "order " + order);
                double last = 0;
                for (Progress p : seen) {
                    check(p.elapsedSeconds >= last, "elapsed time runs backwards");
                    last = p.elapsedSeconds;
                    if (p.stage == Progress.Stage.SAMPLING && p.preview == null) {
                        check(p.remainingSeconds >= 0 && (p.done < p.total || p.remainingSeconds == 0), "remaining " + p);
                    }
                }
                Progress done = seen.get(seen.size() - 1);
                check(done.stage == Progress.Stage.DONE && done.elapsedSeconds > 0, "done " + done);
                check(image.samplingSeconds > 0 && image.decodeSeconds > 0, "image timings");
            });

            test("ARGB output equals the PNG's pixels, and the PNG is made only when asked", () -> {
                Image image = sd.generate(small(sd, "a green triangle"));
                java.awt.image.BufferedImage png = javax.imageio.ImageIO.read(new java.io.ByteArrayInputStream(image.png()));
                check(png.getWidth() == image.width && png.getHeight() == image.height, "PNG size");
                int[] argb = new int[image.width * image.height];
                image.copyPixelsTo(argb);
                check(Arrays.equals(argb, image.argb()), "copyPixelsTo");
                for (int y = 0; y < image.height; y++) {
                    for (int x = 0; x < image.width; x++) {
                        check(png.getRGB(x, y) == argb[y * image.width + x], "pixel " + x + "," + y);
                    }
                }
                check(Arrays.equals(image.png(), image.png()), "the same PNG twice");
            });

            test("plan(): each stage's need and the peak; a budget tiles the decode, and one below every plan is refused up front", () -> {
                Request r = sd.request("a red circle on a blue background");
                r.width = r.height = 512;
                r.steps = 1;
                Plan free = sd.plan(r);
                List<String> stages = new ArrayList<>();
                long largest = 0;
                for (Plan.Need n : free.stages()) {
                    stages.add(n.stage);
                    largest = Math.max(largest, n.totalBytes());
                }
                check(stages.contains("text") && stages.contains("unet") && stages.contains("decode"), "stages " + stages);
                check(free.peakBytes > largest && free.tileSize == 0, "whole decode, peak " + free.peakBytes);
                contains(free.summary, "decode");
                System.out.printf("     demo 512x512: peak %d MiB unplanned%n", free.peakBytes >> 20);
                r.maxMemory = 150L << 20;
                Plan capped = sd.plan(r);
                check(capped.budgetBytes == 150L << 20 && capped.tileSize > 0 && capped.peakBytes <= capped.budgetBytes,
                        "a 150 MiB plan: tiles " + capped.tileSize + ", peak " + (capped.peakBytes >> 20) + " MiB");
                Image image = sd.generate(r);
                check(image.width == 512, "the capped run");
                r.maxMemory = 60L << 20;
                SdrsException e = expect(SdrsException.class, () -> sd.plan(r));
                contains(e.getMessage(), "cannot fit");
                List<Progress> none = new ArrayList<>();
                contains(expect(SdrsException.class, () -> sd.generate(r, none::add)).getMessage(), "cannot fit");
                check(none.size() <= 1, "the refused run did work: " + none);
            });

            test("a Cancellation stops its own call only; a cancelled one refuses at once", () -> {
                try (StableDiffusion other = StableDiffusion.demo(1)) {
                    Cancellation mine = new Cancellation();
                    LongRun stopped = new LongRun(sd, mine);
                    LongRun goesOn = new LongRun(other, new Cancellation());
                    stopped.start();
                    goesOn.start();
                    check(stopped.firstStep.await(120, TimeUnit.SECONDS) && goesOn.firstStep.await(120, TimeUnit.SECONDS), "no first steps");
                    mine.cancel();
                    stopped.join(120_000);
                    check(stopped.thrown.get() instanceof CancelledException, "thrown: " + stopped.thrown.get());
                    check(stopped.stepsDone() < stopped.total / 2, stopped.stepsDone() + " steps after cancel");
                    check(goesOn.isAlive(), "the other call stopped too");
                    // The same model takes new calls at once; the cancelled token refuses them.
                    check(sd.generate(small(sd, "a red circle")).width == 64, "the model carries on");
                    int[] calls = {0};
                    expect(CancelledException.class, () -> sd.generate(small(sd, "a red circle"), p -> calls[0]++, mine));
                    check(calls[0] <= 1, calls[0] + " callbacks for a cancelled token");
                    other.cancel();
                    goesOn.join(120_000);
                    check(goesOn.thrown.get() instanceof CancelledException, "model cancel: " + goesOn.thrown.get());
                }
            });

            test("controlNet: a silhouette on the left puts the shape there; half a pair or a bad file is refused", () -> {
                String net = "models/demo/sdrs-demo-controlnet-q8_0.gguf";
                int[] left = new int[64 * 64];
                for (int y = 0; y < 64; y++) {
                    for (int x = 0; x < 64; x++) {
                        boolean in = Math.abs(x - 18) <= 13 && Math.abs(y - 32) <= 13;
                        left[y * 64 + x] = in ? 0xFFFFFFFF : 0xFF000000;
                    }
                }
                Request r = small(sd, "a large red square on a blue background").controlNet(net, left, 64, 64);
                Image image = sd.generate(r, null);
                contains(image.parameters, "ControlNet 0: \"Module: none, Model: sdrs-demo-controlnet-q8_0");
                // More of the red shape in the left half than in the right.
                long leftRed = 0, rightRed = 0;
                int[] argb = image.argb();
                for (int i = 0; i < argb.length; i++) {
                    int red = (argb[i] >> 16) & 0xFF;
                    if (i % 64 < 32) {
                        leftRed += red;
                    } else {
                        rightRed += red;
                    }
                }
                check(leftRed > 2 * rightRed, "red left " + leftRed + ", right " + rightRed);
                r.canny = true;
                contains(sd.generate(r, null).parameters, "Module: canny");
                Request half = small(sd, "a red square");
                half.controlImage = left;
                contains(expect(SdrsException.class, () -> sd.generate(half, null)).getMessage(), "go together");
                Request bad = small(sd, "a red square").controlNet(new File(tmp, "none.gguf").getPath(), left, 64, 64);
                contains(expect(SdrsException.class, () -> sd.generate(bad, null)).getMessage(), "none.gguf");
            });

            test("upscale: an ESRGAN-family file enlarges an image and says so in its parameters", () -> {
                Image image = sd.generate(small(sd, "a red circle"), null);
                Image big = StableDiffusion.upscale("tests/fixtures/ref/esrgan/compact-x4.safetensors", image, 1, THREADS);
                check(big.width == 256 && big.height == 256, "size " + big.width + "x" + big.height);
                contains(big.parameters, "a red circle");
                contains(big.parameters, "Postprocess upscaler: compact-x4, Postprocess upscale by: 4");
                contains(expect(SdrsException.class,
                        () -> StableDiffusion.upscale("models/demo/sdrs-demo-lcm-q8_0.gguf", image, 1, THREADS)).getMessage(),
                        "sdrs-demo-lcm-q8_0.gguf");
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
            expect(CancelledException.class, () -> inner.generate(r, p -> {
                calls[0]++;
                inner.close();
            }));
            check(calls[0] == 1, calls[0] + " steps after close");
            check(liveModels() == baseline, "freed when the listener's run returned");
        });

        test("stress: 6 threads on 3 models (two of one file) with plans, previews, per-call and model cancels and a close; finished images equal those made alone", () -> {
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
            List<Cancellation> tokens = new ArrayList<>();
            for (int t = 0; t < 6; t++) {
                final int id = t;
                threads.add(new Thread(() -> {
                    for (int i = 0; i < 4; i++) {
                        int m = (id + i) % models.length, s = (id * 7 + i) % seeds;
                        try {
                            Request r = small(models[m], "a red circle");
                            r.seed = 100 + s;
                            r.previewEvery = 2;
                            if (models[m].plan(r).peakBytes <= 0) {
                                failed.compareAndSet(null, new AssertionError("an empty plan"));
                            }
                            // Thread 5's runs carry tokens that the canceller cancels.
                            Cancellation token = new Cancellation();
                            if (id == 5) {
                                synchronized (tokens) {
                                    tokens.add(token);
                                }
                            }
                            int[] previews = {0};
                            int[] argb = models[m].generate(r, p -> previews[0] += p.preview != null ? 1 : 0, token).argb();
                            if (!Arrays.equals(argb, alone[m][s])) {
                                failed.compareAndSet(null, new AssertionError("model " + m + " seed " + s + ": another image under load"));
                            }
                            if (previews[0] != 2) {
                                failed.compareAndSet(null, new AssertionError(previews[0] + " previews of 4 steps every 2"));
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
            // An eighth cancels thread 5's calls, one token at a time.
            Thread canceller = new Thread(() -> {
                for (int i = 0; i < 40; i++) {
                    try {
                        Thread.sleep(10);
                    } catch (InterruptedException e) {
                        return;
                    }
                    synchronized (tokens) {
                        if (!tokens.isEmpty()) {
                            tokens.remove(0).cancel();
                        }
                    }
                }
            });
            threads.forEach(Thread::start);
            canceller.start();
            meddler.start();
            for (Thread t : threads) {
                t.join(300_000);
                check(!t.isAlive(), "a stress thread is stuck");
            }
            meddler.join();
            canceller.join();
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
