package org.sdrs;

import javax.annotation.Nonnull;

/**
 * Progress of a {@link StableDiffusion#generate} call, called on the thread that runs it
 * (post to the UI thread from here): once as the run starts ({@code TEXT}), after each
 * sampling step, with each preview, as the decode starts and at each of its tiles, and
 * when the image is made ({@code DONE}). An exception thrown here stops the run, and
 * {@code generate} rethrows it.
 */
public interface ProgressListener {
    void onProgress(@Nonnull Progress progress);
}
