package org.sdrs;

import javax.annotation.CheckForNull;
import javax.annotation.Nonnull;

/**
 * A Stable Diffusion model, loaded from a GGUF file (memory-mapped, not read into
 * memory) or the small demo model built into the library.
 *
 * <p>Thread safety: every method may be called from any thread. {@link #generate}
 * runs one image at a time per model; a second call waits for the first.
 * {@link #cancel}, {@link #close} and {@link Cancellation#cancel} never wait for a run.
 *
 * <pre>{@code
 * try (StableDiffusion sd = StableDiffusion.load(path, 0)) {
 *     Request r = sd.request("a lighthouse at dawn");
 *     r.maxMemory = 512L << 20;
 *     Plan plan = sd.plan(r);               // what it needs, or SdrsException if it cannot fit
 *     Image image = sd.generate(r, p -> post(p.stage, p.done, p.total), cancellation);
 *     Bitmap bitmap = Bitmap.createBitmap(image.argb(), image.width, image.height, Bitmap.Config.ARGB_8888);
 * }
 * }</pre>
 */
public final class StableDiffusion implements AutoCloseable {
    static {
        System.loadLibrary("sdrs");
    }

    // All guarded by this. The native model is freed once: by close() when no call is
    // in flight, else by the last call to return, so no call ever sees it freed.
    private long handle;
    private int calls;
    private boolean closed;
    /** How many times cancel() was called: a run started before the n-th call has a ticket below n. */
    private long cancels;

    private StableDiffusion(long handle) {
        this.handle = handle;
    }

    /**
     * Opens a GGUF model file (see {@code sdrs convert}).
     *
     * @param threads worker threads; 0 or less for every core
     */
    @Nonnull
    public static StableDiffusion load(@Nonnull String path, int threads) throws SdrsException {
        return new StableDiffusion(nativeLoad(path, threads));
    }

    /**
     * Opens a GGUF model from a file descriptor, as Android's storage access framework
     * gives ({@code ParcelFileDescriptor.getFd()}). The library keeps a duplicate, so the
     * caller may close its descriptor once this returns.
     */
    @Nonnull
    public static StableDiffusion fromFd(int fd, int threads) throws SdrsException {
        return new StableDiffusion(nativeFromFd(fd, threads));
    }

    /** The demo model built into the library: coloured shapes, 64x64, 4 LCM steps; nothing to download. */
    @Nonnull
    public static StableDiffusion demo(int threads) throws SdrsException {
        return new StableDiffusion(nativeDemo(threads));
    }

    /**
     * A request for {@code prompt} with the model's defaults (size, steps, sampler,
     * schedule, guidance scale) and the CLI's for the rest filled in.
     */
    @Nonnull
    public Request request(@Nonnull String prompt) {
        Request r = new Request(prompt);
        long h = enter();
        try {
            nativeDefaults(h, r);
        } finally {
            leave();
        }
        return r;
    }

    /**
     * Adds textual-inversion embeddings: a file ({@code .pt}, {@code .bin},
     * {@code .safetensors}; A1111, diffusers or SDXL {@code clip_l}/{@code clip_g}), or every
     * such file of a folder (files for other models are skipped). Each is triggered by its
     * file name without the extension (and a diffusers file's own token) in prompts.
     *
     * @return how many embeddings were added
     * @throws SdrsException for an unreadable file or one for another model (the message names it)
     */
    public int addEmbeddings(@Nonnull String path) throws SdrsException {
        long h = enter();
        try {
            return nativeAddEmbeddings(h, path);
        } finally {
            leave();
        }
    }

    /**
     * Decodes with this VAE (a single file, original or diffusers naming, e.g.
     * {@code vae-ft-mse-840000-ema-pruned.safetensors}) instead of the model's. Waits for
     * a run in progress.
     *
     * @throws SdrsException for an unreadable file or a VAE of another shape (the message names it)
     */
    public void setVae(@Nonnull String path) throws SdrsException {
        long h = enter();
        try {
            nativeSetVae(h, path);
        } finally {
            leave();
        }
    }

    /**
     * What {@code request} needs in memory, stage by stage, and how it would run within
     * its {@link Request#maxMemory} budget (tiled decode, guidance in two batches): the
     * run's graphs are built and measured, nothing is computed. Takes a fraction of a
     * second; waits for a run in progress on this model.
     *
     * @throws SdrsException when no plan fits the budget (the message names the stage
     *     and its need), or for a request the model cannot run
     */
    @Nonnull
    public Plan plan(@Nonnull Request request) throws SdrsException {
        long h = enter();
        try {
            return nativePlan(h, request);
        } finally {
            leave();
        }
    }

    /** {@link #generate(Request, ProgressListener, Cancellation)} with no listener and no token. */
    @Nonnull
    public Image generate(@Nonnull Request request) throws SdrsException {
        return generate(request, null, null);
    }

    /** {@link #generate(Request, ProgressListener, Cancellation)} with no token. */
    @Nonnull
    public Image generate(@Nonnull Request request, @CheckForNull ProgressListener listener) throws SdrsException {
        return generate(request, listener, null);
    }

    /**
     * Generates an image; blocks until it is done.
     *
     * @param listener called on this thread as the run goes; may be null
     * @param cancellation stops this call when cancelled (before or during it); may be null
     * @throws CancelledException when {@code cancellation}, {@link #cancel} or
     *     {@link #close} stopped the run
     * @throws SdrsException for a request the model cannot run (the message says why),
     *     or one over its {@link Request#maxMemory} budget (before any work)
     * @throws IllegalStateException after {@link #close}
     */
    @Nonnull
    public Image generate(@Nonnull Request request, @CheckForNull ProgressListener listener, @CheckForNull Cancellation cancellation) throws SdrsException {
        long h;
        long ticket;
        synchronized (this) {
            h = enter();
            ticket = cancels;
        }
        try {
            return nativeGenerate(h, ticket, request, listener, cancellation);
        } finally {
            leave();
        }
    }

    /**
     * Stops every {@link #generate} call on this model in progress, running or waiting for
     * another, at its next sampling step; each then throws {@link CancelledException}.
     * Later calls are not affected. To stop one call, give it a {@link Cancellation}.
     */
    public synchronized void cancel() {
        if (closed) {
            throw new IllegalStateException("StableDiffusion is closed");
        }
        cancels++;
        nativeCancel(handle, cancels);
    }

    /**
     * Releases the model. A {@link #generate} still running is cancelled and the model
     * is freed when it returns. Closing again does nothing; any other use after this
     * throws {@link IllegalStateException}.
     */
    @Override
    public void close() {
        long h;
        synchronized (this) {
            if (closed) {
                return;
            }
            closed = true;
            if (calls > 0) {
                cancels++;
                nativeCancel(handle, cancels);
                return;
            }
            h = handle;
            handle = 0;
        }
        nativeFree(h);
    }

    private synchronized long enter() {
        if (closed) {
            throw new IllegalStateException("StableDiffusion is closed");
        }
        calls++;
        return handle;
    }

    private void leave() {
        long h = 0;
        synchronized (this) {
            if (--calls == 0 && closed) {
                h = handle;
                handle = 0;
            }
        }
        if (h != 0) {
            nativeFree(h);
        }
    }

    /**
     * Enlarges {@code image} with an ESRGAN-family upscaler (RRDBNet or SRVGGNetCompact
     * weights, .pth or .safetensors: the CLI's {@code sdrs upscale}), {@code repeats}
     * times, in tiles that fit the process's memory cgroup. The parameters gain the
     * upscaler's name and scale.
     *
     * @throws SdrsException if the file is not an upscaler or the image cannot be enlarged
     */
    @Nonnull
    public static Image upscale(@Nonnull String upscaler, @Nonnull Image image, int repeats, int threads) throws SdrsException {
        return nativeUpscale(upscaler, image.width, image.height, image.argb(), image.parameters, repeats, threads);
    }

    private static native Image nativeUpscale(String upscaler, int width, int height, int[] argb, String parameters, int repeats, int threads) throws SdrsException;

    private static native long nativeLoad(String path, int threads) throws SdrsException;

    private static native long nativeFromFd(int fd, int threads) throws SdrsException;

    private static native long nativeDemo(int threads) throws SdrsException;

    private static native void nativeDefaults(long handle, Request request);

    private static native Image nativeGenerate(long handle, long ticket, Request request, ProgressListener listener, Cancellation cancellation) throws SdrsException;

    private static native Plan nativePlan(long handle, Request request) throws SdrsException;

    private static native void nativeSetVae(long handle, String path) throws SdrsException;

    private static native void nativeCancelToken(long id);

    private static native byte[] nativePng(int width, int height, int[] argb, String parameters) throws SdrsException;

    static void cancelToken(long id) {
        nativeCancelToken(id);
    }

    static byte[] png(int width, int height, int[] argb, String parameters) throws SdrsException {
        return nativePng(width, height, argb, parameters);
    }

    private static native int nativeAddEmbeddings(long handle, String path) throws SdrsException;

    private static native void nativeCancel(long handle, long cancels);

    private static native void nativeFree(long handle);

    // For tests (called by reflection): native models not yet freed, and a panic inside
    // an entry point, which must arrive as an SdrsException.
    private static native int nativeLiveModels();

    private static native void nativePanicForTest(String message) throws SdrsException;

    // The request option fields the library reads, as "name:descriptor".
    private static native String[] nativeOptionFields();
}
