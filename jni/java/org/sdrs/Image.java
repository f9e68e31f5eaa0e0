package org.sdrs;

import javax.annotation.Nonnull;

/** A generated picture. */
public final class Image {
    public final int width;
    public final int height;
    /** A1111-style generation parameters (prompt, steps, sampler, CFG, seed, size, model), as in the PNG's text chunk. */
    @Nonnull public final String parameters;
    /** Seconds spent reading the prompts, sampling and decoding. */
    public final double textSeconds;
    public final double samplingSeconds;
    public final double decodeSeconds;
    private final int[] argb;
    private byte[] png;

    // Made by the native library only.
    Image(int width, int height, int[] argb, String parameters, double textSeconds, double samplingSeconds, double decodeSeconds) {
        this.width = width;
        this.height = height;
        this.argb = argb;
        this.parameters = parameters;
        this.textSeconds = textSeconds;
        this.samplingSeconds = samplingSeconds;
        this.decodeSeconds = decodeSeconds;
    }

    /**
     * The pixels, row by row, as opaque ARGB_8888 ints: what
     * {@code Bitmap.createBitmap(argb(), width, height, Bitmap.Config.ARGB_8888)} or
     * {@code Bitmap.setPixels(argb(), 0, width, 0, 0, width, height)} takes. A copy.
     */
    @Nonnull
    public int[] argb() {
        return argb.clone();
    }

    /** Copies the pixels into {@code out} (at least width x height ints) without a new array. */
    public void copyPixelsTo(@Nonnull int[] out) {
        System.arraycopy(argb, 0, out, 0, argb.length);
    }

    /**
     * The picture as a PNG file (RGB, with the {@code parameters} text chunk, UTF-8 iTXt
     * beyond Latin-1), encoded on first use: an app that shows the pixels never pays for
     * it. A copy.
     *
     * @throws SdrsException if encoding fails
     */
    @Nonnull
    public synchronized byte[] png() throws SdrsException {
        if (png == null) {
            png = StableDiffusion.png(width, height, argb, parameters);
        }
        return png.clone();
    }
}
