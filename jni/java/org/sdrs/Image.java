package org.sdrs;

/** A generated picture. */
public final class Image {
    public final int width;
    public final int height;
    /** A1111-style generation parameters (prompt, steps, sampler, CFG, seed, size, model), as in the PNG's text chunk. */
    public final String parameters;
    private final int[] argb;
    private final byte[] png;

    // Made by the native library only.
    Image(int width, int height, int[] argb, byte[] png, String parameters) {
        this.width = width;
        this.height = height;
        this.argb = argb;
        this.png = png;
        this.parameters = parameters;
    }

    /**
     * The pixels, row by row, as opaque ARGB_8888 ints: what
     * {@code Bitmap.setPixels(argb(), 0, width, 0, 0, width, height)} takes. A copy.
     */
    public int[] argb() {
        return argb.clone();
    }

    /** The picture as a PNG file (RGB, with the {@code parameters} text chunk). A copy. */
    public byte[] png() {
        return png.clone();
    }
}
