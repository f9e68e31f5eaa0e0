package org.sdrs;

import javax.annotation.CheckForNull;
import javax.annotation.Nonnull;

/** Where a {@link StableDiffusion#generate} call is, as its {@link ProgressListener} sees it. */
public final class Progress {
    /** The stages of a run, in order. */
    public enum Stage {
        /** Reading the prompts (the text encoders). */
        TEXT,
        /** Sampling: {@link #done} of {@link #total} steps finished. */
        SAMPLING,
        /** Decoding latents into pixels: {@link #done} of {@link #total} tiles (0 of 1 for a whole-image decode). */
        DECODING,
        /** The image is made. */
        DONE
    }

    @Nonnull public final Stage stage;
    /** Units of this stage finished, and how many there are (steps while sampling, tiles while decoding). */
    public final int done;
    public final int total;
    /** Seconds since the call started (waiting for another run on the model not counted). */
    public final double elapsedSeconds;
    /**
     * Estimated seconds until sampling ends, from the steps so far (NaN where no estimate
     * exists: before the first step, in previews, while decoding).
     */
    public final double remainingSeconds;
    /**
     * A preview of the image forming ({@link Request#previewEvery}), as opaque ARGB_8888
     * ints for {@code Bitmap.createBitmap(preview, previewWidth, previewHeight,
     * Bitmap.Config.ARGB_8888)}; the listener's to keep. Null on other calls.
     */
    @CheckForNull public final int[] preview;
    public final int previewWidth;
    public final int previewHeight;

    // Made by the native library only.
    Progress(int stage, int done, int total, double elapsedSeconds, double remainingSeconds, int[] preview, int previewWidth, int previewHeight) {
        this.stage = Stage.values()[stage];
        this.done = done;
        this.total = total;
        this.elapsedSeconds = elapsedSeconds;
        this.remainingSeconds = remainingSeconds;
        this.preview = preview;
        this.previewWidth = previewWidth;
        this.previewHeight = previewHeight;
    }

    @Override
    @Nonnull
    public String toString() {
        return stage + " " + done + "/" + total + String.format(" %.1f s", elapsedSeconds)
                + (preview != null ? " preview " + previewWidth + "x" + previewHeight : "");
    }
}
