package org.sdrs;

/**
 * A Stable Diffusion model, loaded from a GGUF file (memory-mapped, not read into
 * memory) or the small demo model built into the library.
 *
 * <p>Thread safety: every method may be called from any thread. {@link #generate}
 * runs one image at a time per model; a second call waits for the first.
 * {@link #cancel} and {@link #close} never wait for a run.
 *
 * <pre>{@code
 * try (StableDiffusion sd = StableDiffusion.load(path, 0)) {
 *     Request r = sd.request("a lighthouse at dawn");
 *     Image image = sd.generate(r, (done, total) -> post(done, total));
 *     bitmap.setPixels(image.argb(), 0, image.width, 0, 0, image.width, image.height);
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
    public static StableDiffusion load(String path, int threads) throws SdrsException {
        return new StableDiffusion(nativeLoad(path, threads));
    }

    /**
     * Opens a GGUF model from a file descriptor, as Android's storage access framework
     * gives ({@code ParcelFileDescriptor.getFd()}). The library keeps a duplicate, so the
     * caller may close its descriptor once this returns.
     */
    public static StableDiffusion fromFd(int fd, int threads) throws SdrsException {
        return new StableDiffusion(nativeFromFd(fd, threads));
    }

    /** The demo model built into the library: coloured shapes, 64x64, 4 LCM steps; nothing to download. */
    public static StableDiffusion demo(int threads) throws SdrsException {
        return new StableDiffusion(nativeDemo(threads));
    }

    /** A request for {@code prompt} with the model's defaults (size, steps, sampler, guidance scale) filled in. */
    public Request request(String prompt) {
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
    public int addEmbeddings(String path) throws SdrsException {
        long h = enter();
        try {
            return nativeAddEmbeddings(h, path);
        } finally {
            leave();
        }
    }

    /**
     * Generates an image; blocks until it is done.
     *
     * @param listener called after each sampling step on this thread; may be null
     * @throws CancelledException when {@link #cancel} or {@link #close} stopped the run
     * @throws SdrsException for a request the model cannot run (the message says why)
     * @throws IllegalStateException after {@link #close}
     */
    public Image generate(Request request, ProgressListener listener) throws SdrsException {
        long h;
        long ticket;
        synchronized (this) {
            h = enter();
            ticket = cancels;
        }
        try {
            return nativeGenerate(h, ticket, request, listener);
        } finally {
            leave();
        }
    }

    /**
     * Stops every {@link #generate} call in progress, running or waiting for another, at
     * its next sampling step; each then throws {@link CancelledException}. Later calls
     * are not affected.
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

    private static native long nativeLoad(String path, int threads) throws SdrsException;

    private static native long nativeFromFd(int fd, int threads) throws SdrsException;

    private static native long nativeDemo(int threads) throws SdrsException;

    private static native void nativeDefaults(long handle, Request request);

    private static native Image nativeGenerate(long handle, long ticket, Request request, ProgressListener listener) throws SdrsException;

    private static native int nativeAddEmbeddings(long handle, String path) throws SdrsException;

    private static native void nativeCancel(long handle, long cancels);

    private static native void nativeFree(long handle);

    // For tests (called by reflection): native models not yet freed, and a panic inside
    // an entry point, which must arrive as an SdrsException.
    private static native int nativeLiveModels();

    private static native void nativePanicForTest(String message) throws SdrsException;
}
