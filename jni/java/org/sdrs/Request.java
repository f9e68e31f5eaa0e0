package org.sdrs;

/**
 * What to generate. Fields left unset (sizes and steps 0, {@code sampler} null,
 * {@code cfgScale} NaN) take the model's own defaults; {@link StableDiffusion#request}
 * returns a request with them filled in, to show or adjust.
 */
public final class Request {
    public String prompt;
    /** The negative prompt; null or empty for none. */
    public String negative = "";
    /** Image size in pixels; a multiple of what the model allows (64 for SD 1.x/2.x, 32 for the demo model). 0: the model's default. */
    public int width;
    public int height;
    /** Sampling steps; 0: the model's default. */
    public int steps;
    /** A sampler name as the CLI's {@code --sampler} takes: euler, euler_a, dpm++2m, lcm, ... null: the model's default. */
    public String sampler;
    /** Classifier-free guidance scale; 1 skips the unconditional pass. NaN: the model's default. */
    public float cfgScale = Float.NaN;
    /** Noise seed: the same seed, request and model give the same image (the bits are read as an unsigned 64-bit number). */
    public long seed = 42;
    /** Reserved for img2img (how far to move from {@link #initImage}); not used by this version. */
    public float strength = 0.75f;
    /**
     * Reserved for img2img: the starting picture as ARGB_8888 ints, width x height.
     * This version generates from text only and refuses a request where it is set.
     */
    public int[] initImage;

    public Request(String prompt) {
        this.prompt = prompt;
    }
}
