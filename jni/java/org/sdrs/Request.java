package org.sdrs;

import javax.annotation.CheckForNull;
import javax.annotation.Nonnull;

/**
 * What to generate. Fields left unset (0, null, NaN, false) take the model's defaults,
 * as the CLI's unset options do; {@link StableDiffusion#request} returns a request with
 * them filled in (the model's own, else the CLI's defaults), to show or adjust.
 *
 * <p>The option fields are the {@code sdrs generate} flags of the same name in camel
 * case ({@code cfgScale} is {@code --cfg-scale}), read by the library from one table it
 * shares with the CLI: the same names, values, checks and messages.
 */
public final class Request {
    /** The prompt: A1111's emphasis syntax, any length, {@code BREAK}, {@code <lora:NAME:MULTIPLIER>} tags. */
    @Nonnull public String prompt;
    /** Noise seed: the same seed, request and model give the same image (the bits are read as an unsigned 64-bit number). */
    public long seed = 42;
    /** Image size in pixels; a multiple of what the model allows (64 for SD 1.x/2.x, 32 for the demo model). 0: the init picture's, else the preset's, else the model's. */
    public int width;
    public int height;

    // The options, in the CLI's words (--preset, --negative-prompt, ...).

    /**
     * A distilled model's recipe (size, sampler, schedule, steps, guidance): sdxl-turbo,
     * sd-turbo, sdxl-lightning-2step, -4step, -8step. Fields set beside it win, those
     * {@link StableDiffusion#request} fills in too: give a preset on a {@code new Request}.
     */
    @CheckForNull public String preset;
    /** The negative prompt; null or empty for none. */
    @CheckForNull public String negative;
    /** Sampling steps; 0: the model's default. */
    public int steps;
    /** Classifier-free guidance scale; 1 skips the unconditional pass. NaN: the model's default. */
    public float cfgScale = Float.NaN;
    /**
     * A sampler name as the CLI's {@code --sampler} takes: euler, euler_a, dpm++2m, lcm, ..., also
     * A1111's ("DPM++ 2M Karras", which sets the scheduler too) and ComfyUI's (euler_ancestral,
     * dpmpp_2m). null: the model's default.
     */
    @CheckForNull public String sampler;
    /**
     * A σ schedule as the CLI's {@code --scheduler} takes: karras, exponential, sgm_uniform,
     * ... null: the sampler name's ("DPM++ 2M Karras"), else the model's ({@link
     * StableDiffusion#request} leaves it null for that reason).
     */
    @CheckForNull public String scheduler;
    /** Noise of ancestral, SDE and DDIM steps (DDIM: 0 deterministic, 1 DDPM; TCD: its γ). NaN: the sampler's. */
    public float eta = Float.NaN;
    /** The σ range's ends. NaN: the model's. */
    public float sigmaMin = Float.NaN;
    public float sigmaMax = Float.NaN;
    /** The noise generator: "torch" (torch's CPU generator), "cuda" (torch's CUDA generator, A1111's GPU noise) or "native". null: torch. */
    @CheckForNull public String rng;
    /** Guidance rescale φ in [0, 1] (0.7 for v-prediction models). NaN: 0. */
    public float guidanceRescale = Float.NaN;
    /** Rescale the noise schedule to zero terminal SNR (models trained that way whose file does not say so). */
    public boolean zeroTerminalSnr;
    /** CLIP skip in A1111's numbering: 1 the model's own text layer, 2 the one before. 0: 1. */
    public int clipSkip;
    /** What prompt weights do: "original" (A1111's), "no-norm", "none". null: original. */
    @CheckForNull public String emphasis;
    /** LoRAs applied at run time (the model file untouched): "FILE" or "FILE:MULTIPLIER" each. null: none. */
    @CheckForNull public String[] loras;
    /**
     * Folder where the prompt's {@code <lora:NAME:MULTIPLIER>} tags find
     * {@code NAME.safetensors} (or .pt, .ckpt, .bin). Null: no tags allowed.
     */
    @CheckForNull public String loraDir;
    /** SDXL size conditioning "WxH": the original size the model is told the picture was cut from. null: the output size. */
    @CheckForNull public String originalSize;
    /** SDXL crop conditioning "TOP,LEFT". null: 0,0. */
    @CheckForNull public String crop;
    /** The SDXL refiner's aesthetic score. NaN: 6. */
    public float aestheticScore = Float.NaN;
    /**
     * img2img / inpainting: how much of {@link #initImage} to repaint, in (0, 1] (the last
     * steps x strength steps run). NaN: 0.8 for img2img, 1 with a mask.
     */
    public float strength = Float.NaN;
    /** Inpainting: keep the decoded image everywhere instead of pasting the original back outside the mask. */
    public boolean noOverlay;
    /** A TAESD-family decoder file ({@code taesd_decoder.pth}) to decode with instead of the VAE: much faster, a little softer. */
    @CheckForNull public String taesd;
    /** Encode and decode images over 512x512 in overlapping 512-pixel tiles even when the whole image fits the memory budget. */
    public boolean vaeTiling;
    /**
     * Where a tiled VAE's GroupNorms take their statistics: "tile", each tile's own (one
     * pass; tones may drift between tiles), or "image", the whole image's (tiles equal the
     * whole decode, about 8x the decode time). Null: "tile".
     */
    @CheckForNull public String vaeTileStats;
    /** Send a preview of the image forming to the {@link ProgressListener} every this many steps (and after the last). 0: none. */
    public int previewEvery;
    /**
     * Memory budget in bytes: the run is planned to fit it (guidance in two batches, the
     * decode in tiles) or refused before it starts, as {@link StableDiffusion#plan} shows.
     * 0: the process's memory cgroup limit, if any.
     */
    public long maxMemory;

    // Pictures (the CLI reads them from files: --init-img, --mask, --pad, --mask-blur).

    /**
     * img2img: the starting picture as ARGB_8888 ints (as {@code Bitmap.getPixels} gives
     * them), row by row, {@link #initWidth} x {@link #initHeight}; alpha is ignored. Any
     * size: with {@link #width}/{@link #height} it is scaled to cover them and centre-cropped
     * (one given, the other follows its aspect ratio); without, it keeps its size cut down to
     * the model's multiple. Null: txt2img.
     */
    @CheckForNull public int[] initImage;
    /** {@link #initImage}'s size; 0: {@link #width}/{@link #height} (else the model's default size). */
    public int initWidth;
    public int initHeight;
    /**
     * Inpainting: with {@link #initImage}, a mask as ARGB_8888 ints, {@link #maskWidth} x
     * {@link #maskHeight} (stretched to the picture if they differ); white repaints, black
     * keeps (its luma is used). The decoded image is pasted back outside it.
     */
    @CheckForNull public int[] maskImage;
    /** {@link #maskImage}'s size; 0: the init picture's. */
    public int maskWidth;
    public int maskHeight;
    /** Gaussian blur of the mask in pixels (σ), softening where the original is pasted back. NaN: 4, as the CLI. */
    public float maskBlur = Float.NaN;
    /** Outpainting: extend the canvas by {left, top, right, bottom} pixels, filled from the picture's edges and masked. null: none. */
    @CheckForNull public int[] pad;

    // ControlNet (the CLI: --control-net, --control-image, --control-strength,
    // --control-start, --control-end, --guess-mode, --canny).

    /**
     * A ControlNet steering the composition: the path of its GGUF ({@code sdrs convert}),
     * or of lllyasviel's .pth/.safetensors or a diffusers folder (converted once, on first
     * use). Each model keeps the ControlNets it has opened. null: none.
     */
    @CheckForNull public String controlNet;
    /**
     * The ControlNet's conditioning image as ARGB_8888 ints, {@link #controlWidth} x
     * {@link #controlHeight}: a map already made (edges, depth, pose, scribble), or a
     * picture with {@link #canny}. Fitted to the output size as {@link #initImage} is.
     */
    @CheckForNull public int[] controlImage;
    public int controlWidth;
    public int controlHeight;
    /** Scale of the ControlNet's residuals. NaN: 1. */
    public float controlStrength = Float.NaN;
    /** The share of the steps it acts on, from {@link #controlStart} to {@link #controlEnd}. NaN: 0 and 1. */
    public float controlStart = Float.NaN;
    public float controlEnd = Float.NaN;
    /** Guess mode: the negative branch gets no residuals, the deep ones weigh most. */
    public boolean guessMode;
    /** Turn {@link #controlImage} into a canny edge map first (thresholds 100 and 200). */
    public boolean canny;

    public Request(@Nonnull String prompt) {
        this.prompt = prompt;
    }

    /** Sets {@link #controlNet}, {@link #controlImage} and its size; returns this. */
    @Nonnull
    public Request controlNet(@Nonnull String path, @Nonnull int[] argb, int width, int height) {
        this.controlNet = path;
        this.controlImage = argb;
        this.controlWidth = width;
        this.controlHeight = height;
        return this;
    }

    /** Sets {@link #initImage} and its size; returns this. */
    @Nonnull
    public Request initImage(@Nonnull int[] argb, int width, int height) {
        this.initImage = argb;
        this.initWidth = width;
        this.initHeight = height;
        return this;
    }

    /** Sets {@link #maskImage} and its size; returns this. */
    @Nonnull
    public Request maskImage(@Nonnull int[] argb, int width, int height) {
        this.maskImage = argb;
        this.maskWidth = width;
        this.maskHeight = height;
        return this;
    }
}
