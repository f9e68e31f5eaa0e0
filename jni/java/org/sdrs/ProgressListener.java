package org.sdrs;

/**
 * Sampling progress, called on the thread that runs {@link StableDiffusion#generate}
 * (post to the UI thread from here). An exception thrown from {@code onStep} stops the
 * run, and {@code generate} rethrows it.
 */
public interface ProgressListener {
    /** {@code done} of {@code total} sampling steps are finished (1, 2, ... total). */
    void onStep(int done, int total);
}
