package org.sdrs;

import javax.annotation.Nonnull;

/**
 * What a request needs in memory, stage by stage, and the choices that fit it into the
 * budget ({@link Request#maxMemory}), from {@link StableDiffusion#plan}: measured from the
 * run's graphs, before any work. An app compares {@link #peakBytes} with what it may use
 * (its per-app budget, {@code ActivityManager.getMemoryClass()}) and picks a size, a TAESD
 * decoder or a budget that fits.
 */
public final class Plan {
    /** One stage: the weights it reads, its compute buffer, and its other buffers. */
    public static final class Need {
        /** "text", "encode", "unet", "decode". */
        @Nonnull public final String stage;
        public final long weightBytes;
        public final long computeBytes;
        public final long otherBytes;

        Need(String stage, long weightBytes, long computeBytes, long otherBytes) {
            this.stage = stage;
            this.weightBytes = weightBytes;
            this.computeBytes = computeBytes;
            this.otherBytes = otherBytes;
        }

        public long totalBytes() {
            return weightBytes + computeBytes + otherBytes;
        }
    }

    /** Estimated peak resident memory of the run: its largest stage and the process's fixed overhead. */
    public final long peakBytes;
    @Nonnull private final Need[] stages;
    /** The budget planned for ({@link Request#maxMemory}, else the memory cgroup's limit); 0 for none. */
    public final long budgetBytes;
    /** The guided UNet runs its two branches one after the other (half the buffer, the same image). */
    public final boolean splitGuidance;
    /**
     * The UNet reads its weights from the model file as it needs them instead of keeping
     * copies: clean file pages the system may drop under the budget and read again at the
     * next step (slower, but the run fits).
     */
    public final boolean streamUnet;
    /** The VAE decodes in tiles of this many pixels a side; 0 for one whole-image decode. */
    public final int tileSize;
    /** The plan as the CLI's {@code --plan} prints it. */
    @Nonnull public final String summary;

    // Made by the native library only.
    Plan(long peakBytes, Need[] stages, long budgetBytes, boolean splitGuidance, boolean streamUnet, int tileSize, String summary) {
        this.peakBytes = peakBytes;
        this.stages = stages;
        this.budgetBytes = budgetBytes;
        this.splitGuidance = splitGuidance;
        this.streamUnet = streamUnet;
        this.tileSize = tileSize;
        this.summary = summary;
    }

    /** Every stage, in run order. A copy. */
    @Nonnull
    public Need[] stages() {
        return stages.clone();
    }

    @Override
    @Nonnull
    public String toString() {
        return summary;
    }
}
