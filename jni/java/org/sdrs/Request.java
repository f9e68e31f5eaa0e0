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
    /**
     * A sampler name as the CLI's {@code --sampler} takes: euler, euler_a, dpm++2m, lcm, ..., also
     * A1111's ("DPM++ 2M Karras", which sets the scheduler too) and ComfyUI's (euler_ancestral,
     * dpmpp_2m). null: the model's default.
     */
    public String sampler;
    /** A σ schedule as the CLI's {@code --scheduler} takes: karras, exponential, sgm_uniform, ... null: the model's default (or the sampler name's). */
    public String scheduler;
    /** The noise generator: "torch" (torch's CPU generator), "cuda" (torch's CUDA generator, A1111's GPU noise) or "native". null: torch. */
    public String rng;
    /** Classifier-free guidance scale; 1 skips the unconditional pass. NaN: the model's default. */
    public float cfgScale = Float.NaN;
    /** Noise seed: the same seed, request and model give the same image (the bits are read as an unsigned 64-bit number). */
    public long seed = 42;
    /**
     * img2img / inpainting: how much of {@link #initImage} to repaint, in (0, 1] (the last
     * steps x strength steps run). NaN: 0.8 for img2img, 1 with a mask.
     */
    public float strength = Float.NaN;
    /** CLIP skip in A1111's numbering: 1 the model's own text layer, 2 the one before. 0: 1. */
    public int clipSkip;
    /**
     * Folder where the prompt's {@code <lora:NAME:MULTIPLIER>} tags find
     * {@code NAME.safetensors} (or .pt, .ckpt, .bin), applied at run time. Null: no tags allowed.
     */
    public String loraDir;
    /**
     * Encode and decode images over 512x512 in overlapping 512-pixel tiles even when the
     * whole image would fit the memory budget (the planner tiles on its own when it would not).
     */
    public boolean vaeTiling;
    /**
     * Where a tiled VAE's GroupNorms take their statistics: "tile", each tile's own (one
     * pass; tones may drift between tiles), or "image", the whole image's (tiles equal the
     * whole decode, about 10x the decode time). Null: "tile".
     */
    public String vaeTileStats;
    /**
     * img2img: the starting picture as ARGB_8888 ints (as {@code Bitmap.getPixels} gives
     * them), width x height of this request, row by row; alpha is ignored. Null: txt2img.
     */
    public int[] initImage;
    /**
     * Inpainting: with {@link #initImage}, a mask of the same size as ARGB_8888 ints; white
     * repaints, black keeps (its luma is used). The decoded image is pasted back outside it.
     */
    public int[] maskImage;

    public Request(String prompt) {
        this.prompt = prompt;
    }
}
