#!/usr/bin/env python3
"""Golden fixtures of a tiny SDXL pipeline from the reference implementation (diffusers).

Builds a tiny StableDiffusionXLPipeline with seeded random weights rounded to float16
(two text encoders: a CLIP-L-style CLIPTextModel and a bigG-style
CLIPTextModelWithProjection; a UNet with SDXL's block structure -- no attention at the
first level, two transformer layers at the second, a linear-projection transformer
middle block, the "text_time" added embedding -- and a VAE), saves it as a diffusers
folder and records what diffusers computes from it in float32 on the CPU: both
tokenizers' ids, the concatenated prompt embeddings and the pooled embedding, the added
time ids and `label_emb`'s input, one UNet output, a 4-step Euler trajectory with CFG
(SDXL base's scheduler config: "leading" spacing) and a 2-step trailing Euler run with
guidance off (SDXL-Lightning style), each decoded by the VAE.

Everything is a pure function of `--seed` (numpy PCG64 streams, as make_fixtures.py).

    /work/venv-ref/bin/python tools/reference/sdxl_fixtures.py --out tests/fixtures/ref/sdxl
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (shared helpers: weights, tokenizer files, goldens)

STREAM_WEIGHTS = 7
STREAM_INPUTS = 16
TIME_ID_DIM = 8  # SDXL: 256
POOLED = 32  # bigG: 1280
GUIDANCE = 5.0  # SDXL base's default
STEPS = 4
LIGHTNING_STEPS = 2
HEIGHT = WIDTH = 16  # 8x8 latent (VAE downscale 2)
# SDXL base's scheduler_config.json (EulerDiscreteScheduler).
SDXL_EULER = dict(mf.SD_SCHEDULE, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                  interpolation_type="linear", use_karras_sigmas=False)
# SDXL-Lightning's recommended scheduler: Euler with "trailing" spacing.
LIGHTNING_EULER = dict(SDXL_EULER, timestep_spacing="trailing")


def configs() -> dict:
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=32,
        cross_attention_dim=64,  # 32 (CLIP-L-like) + 32 (bigG-like)
        attention_head_dim=(2, 4),  # head counts (diffusers' misnomer): width 16 at 64 channels
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_ID_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_ID_DIM,
        flip_sin_to_cos=True,
        freq_shift=0,
        upcast_attention=False,
    )
    vae = dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=HEIGHT, scaling_factor=0.13025, force_upcast=True,
    )
    common = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, max_position_embeddings=77, layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407)
    # SDXL's text_encoder: OpenAI CLIP-L (quick_gelu, pads with <|endoftext|>);
    # text_encoder_2: OpenCLIP bigG (exact gelu, pads with "!", with text_projection).
    text1 = dict(common, hidden_act="quick_gelu", pad_token_id=1)
    text2 = dict(common, hidden_act="gelu", pad_token_id=1, projection_dim=POOLED)
    return dict(unet=unet, vae=vae, text_encoder=text1, text_encoder_2=text2)


def build(seed: int, model_dir: Path, clip_dir: Path) -> dict:
    cfg = configs()
    rng = np.random.default_rng([seed, STREAM_WEIGHTS])
    te1 = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    mf.init_weights(te1, rng)
    mf.init_weights(te2, rng)
    mf.init_weights(unet, rng, {"conv_out": 0.5})
    mf.init_weights(vae, rng, {"decoder.conv_out": 0.5})
    built = {n: {k: v.detach().clone() for k, v in m.state_dict().items()}
             for n, m in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2))}
    tmp = model_dir.parent / "_tok_tmp"
    mf.write_tokenizer(tmp / "tokenizer", clip_dir, "<|endoftext|>")
    mf.write_tokenizer(tmp / "tokenizer_2", clip_dir, "!")
    pipe = StableDiffusionXLPipeline(
        vae=vae.half(), text_encoder=te1.half(), text_encoder_2=te2.half(),
        tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"),
        unet=unet.half(), scheduler=EulerDiscreteScheduler(**SDXL_EULER),
        force_zeros_for_empty_prompt=True,
    )
    if model_dir.exists():
        mf.shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for tok in ("tokenizer", "tokenizer_2"):
        mf.shutil.rmtree(model_dir / tok)
        (tmp / tok).rename(model_dir / tok)
    tmp.rmdir()
    # The published layout of both encoders (transformers 4 names: `text_model.*`, and
    # `text_projection.weight` beside it), as in make_fixtures.build_sd.
    for te in ("text_encoder", "text_encoder_2"):
        f = model_dir / te / "model.safetensors"
        w = load_file(str(f))
        fixed = {k if k.startswith("text_model.") or k.startswith("text_projection") else f"text_model.{k}": v
                 for k, v in w.items()}
        save_file(fixed, str(f), metadata={"format": "pt"})
    return built


def load(model_dir: Path, built: dict) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mf.assert_f16_exact(getattr(pipe, name), name)
        loaded = getattr(pipe, name).state_dict()
        if loaded.keys() != built[name].keys() or not all(torch.equal(loaded[k], built[name][k]) for k in loaded):
            raise SystemExit(f"sdxl_fixtures: {model_dir}/{name} does not load back the weights it was saved with")
    assert pipe.vae_scale_factor == 2 and pipe.config.force_zeros_for_empty_prompt
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    return pipe


def time_ids() -> torch.Tensor:
    # (original height, width) + (crop top, left) + (target height, width), as the pipeline.
    return torch.tensor([[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]], dtype=torch.float32)


def run_traj(pipe, sched_cfg: dict, x_T: torch.Tensor, steps: int, guidance: float, g: dict, key: str, p64) -> dict:
    pipe.scheduler = EulerDiscreteScheduler(**sched_cfg)
    unet_in, unet_t, unet_out, after = [], [], [], []
    h1 = pipe.unet.register_forward_pre_hook(lambda _m, a, kw: (unet_in.append(mf.f32(a[0])), unet_t.append(float(a[1]))) and None, with_kwargs=True)
    h2 = pipe.unet.register_forward_hook(lambda _m, _a, _kw, out: unet_out.append(mf.f32(out[0] if isinstance(out, tuple) else out.sample)) and None, with_kwargs=True)

    def on_step(_pipe, i, t, kw):
        after.append(mf.f32(kw["latents"]))
        return kw

    try:
        lat = pipe(mf.PROMPTS[mf.COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                   guidance_scale=guidance, latents=x_T.clone(), output_type="latent",
                   callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        h1.remove()
        h2.remove()
    assert len(after) == steps and torch.equal(after[-1], lat)
    image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
    np_img = pipe.image_processor.postprocess(image, output_type="np")
    u8 = np.stack([np.asarray(p) for p in pipe.image_processor.numpy_to_pil(np_img)])
    pipe.scheduler = EulerDiscreteScheduler(**sched_cfg)
    pil = pipe(mf.PROMPTS[mf.COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=steps,
               guidance_scale=guidance, latents=x_T.clone(), output_type="pil").images
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), u8), "manual decode differs from the pipeline's"
    sch = pipe.scheduler
    g[f"{key}.unet_in"] = torch.stack(unet_in)
    g[f"{key}.unet_out"] = torch.stack(unet_out)
    g[f"{key}.latents"] = torch.stack(after)
    g[f"{key}.final"] = mf.f32(lat)
    g[f"{key}.image"] = mf.f32(image)
    g[f"{key}.image_u8"] = torch.from_numpy(u8)
    timesteps = [float(t) for t in sch.timesteps]
    assert timesteps == unet_t, (timesteps, unet_t)
    g[f"{key}.timesteps"] = torch.tensor(timesteps, dtype=torch.float32)
    g[f"{key}.sigmas"] = torch.tensor([float(s) for s in sch.sigmas], dtype=torch.float32)
    pipe64 = StableDiffusionXLPipeline(vae=p64["vae"], text_encoder=p64["text_encoder"], text_encoder_2=p64["text_encoder_2"],
                                       tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=p64["unet"],
                                       scheduler=EulerDiscreteScheduler(**sched_cfg), force_zeros_for_empty_prompt=True)
    pipe64.set_progress_bar_config(disable=True)
    lat64 = pipe64(mf.PROMPTS[mf.COND_PROMPT], height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                   guidance_scale=guidance, latents=x_T.double(), output_type="latent").images
    image64 = p64["vae"].decode(lat64 / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return {
        "scheduler": "EulerDiscreteScheduler",
        "config": {k: v for k, v in dict(sch.config).items() if not k.startswith("_")},
        "steps": steps,
        "guidance_scale": guidance,
        "guided": guidance > 1.0,
        "init_noise_sigma": float(sch.init_noise_sigma),
        "timesteps": timesteps,
        "sigmas": [float(s) for s in sch.sigmas],
        "precision_f32_vs_f64": {"final": float(f"{mf.maxdiff(lat, lat64):.3g}"), "image": float(f"{mf.maxdiff(image, image64):.3g}")},
    }


def run(seed: int, model_dir: Path, built: dict) -> tuple[dict, dict]:
    pipe = load(model_dir, built)
    rng = np.random.default_rng([seed, STREAM_INPUTS])
    g: dict[str, torch.Tensor] = {}
    precision: dict[str, float] = {}
    p64 = {n: copy.deepcopy(getattr(pipe, n)).double() for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    watch = mf.ActivationWatch(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    meta: dict = {"model": "sdxl", "prompts": mf.PROMPTS, "cond_prompt": mf.COND_PROMPT}
    with torch.no_grad():
        for key, tok in (("tokens.ids", pipe.tokenizer), ("tokens2.ids", pipe.tokenizer_2)):
            ids = tok(mf.PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            g[key] = ids.to(torch.int32)
        embs, pooled = [], []
        for p in mf.PROMPTS:
            e, _, pl, _ = pipe.encode_prompt(p, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
            embs.append(e)
            pooled.append(pl)
        emb, pooled = torch.cat(embs), torch.cat(pooled)
        g["text.hidden"] = mf.f32(emb)  # [3, 77, 64]: CLIP-L-like penultimate | bigG-like penultimate
        g["text.pooled"] = mf.f32(pooled)  # [3, 32]: bigG-like text_embeds
        ids2 = g["tokens2.ids"].long()
        o64 = p64["text_encoder_2"](ids2, output_hidden_states=True)
        precision["text.pooled"] = mf.maxdiff(pooled, o64.text_embeds)

        # The added conditioning: label_emb's input and output for [uncond "", cond].
        tids = time_ids().repeat(2, 1)
        text_embeds = torch.stack([pooled[1], pooled[mf.COND_PROMPT]])
        time_embeds = pipe.unet.add_time_proj(tids.flatten()).reshape(2, -1)
        y = torch.cat([text_embeds, time_embeds], dim=-1)
        g["add.time_ids"] = tids
        g["add.y"] = mf.f32(y)  # [2, 80]
        g["add.emb"] = mf.f32(pipe.unet.add_embedding(y))  # [2, 128]: label_emb's output

        x = mf.randn(rng, 2, 4, 8, 8)
        ctx = torch.stack([emb[1], emb[mf.COND_PROMPT]])
        g["unet.x"] = x
        g["unet.context"] = mf.f32(ctx)
        added = {"text_embeds": text_embeds, "time_ids": tids}
        out = pipe.unet(x, torch.tensor(500), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        g["unet.t500.out"] = mf.f32(out)
        added64 = {k: v.double() for k, v in added.items()}
        precision["unet.t500.out"] = mf.maxdiff(out, p64["unet"](x.double(), torch.tensor(500), encoder_hidden_states=ctx.double(), added_cond_kwargs=added64).sample)

        x_T = mf.randn(rng, 1, 4, 8, 8)
        g["traj.init_latent"] = x_T
        meta["trajectories"] = {
            "euler": run_traj(pipe, SDXL_EULER, x_T, STEPS, GUIDANCE, g, "traj.euler", p64),
            "lightning": run_traj(pipe, LIGHTNING_EULER, x_T, LIGHTNING_STEPS, 0.0, g, "traj.lightning", p64),
        }
    meta["activation_check"] = watch.close()
    meta["precision_f32_vs_f64"] = {k: float(f"{v:.3g}") for k, v in precision.items()}
    meta["stats"] = {k: mf.stats(v) for k, v in g.items() if v.is_floating_point()}
    meta["configs"] = {
        "unet": {k: v for k, v in dict(pipe.unet.config).items() if k != "_name_or_path"},
        "vae": {k: v for k, v in dict(pipe.vae.config).items() if k != "_name_or_path"},
        "text_encoder": configs()["text_encoder"],
        "text_encoder_2": configs()["text_encoder_2"],
    }
    return g, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=mf.REPO / "tests" / "fixtures" / "ref" / "sdxl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip-dir", type=Path, default=Path("/work/shared/data/clip/hf"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    built = build(args.seed, out / "model", args.clip_dir)
    g, meta = run(args.seed, out / "model", built)
    meta["seed"] = args.seed
    meta["versions"] = mf.versions()
    mf.save_golden(out / "golden.safetensors", g, meta)
    rows = "\n".join(f"| `{k}` | {str(v.dtype).replace('torch.', '')} | {list(v.shape)} |" for k, v in sorted(g.items()))
    (out / "README.md").write_text(
        "# Tiny SDXL reference fixture (diffusers)\n\n"
        f"Written by `tools/reference/sdxl_fixtures.py --seed {args.seed}` (see its docstring); do not edit.\n"
        f"Versions: {json.dumps(meta['versions'])}.\n\n"
        "`model/`: a `StableDiffusionXLPipeline` folder, float16 weights. Goldens computed in float32\n"
        "from those weights; `golden.json` has the configs, schedules and f32-vs-f64 precision.\n\n"
        "- `tokens.ids`, `tokens2.ids`: both tokenizers (the second pads with `!`, id 0), prompts as in `../README.md`.\n"
        "- `text.hidden` [3, 77, 64]: `encode_prompt` (both encoders' penultimate hidden states, concatenated);\n"
        "  `text.pooled` [3, 32]: the second encoder's projected pooled output.\n"
        "- `add.time_ids` [2, 6] (orig h, w, crop top, left, target h, w), `add.y` [2, 80] = pooled | time-id\n"
        "  embeddings for [uncond \"\", cond], `add.emb` = `unet.add_embedding(add.y)`.\n"
        "- `unet.x`, `unet.context` ([\"\", prompt 0]) with `add.y`'s conditioning → `unet.t500.out`.\n"
        f"- `traj.euler.*`: {STEPS} steps, guidance {GUIDANCE}, SDXL base's Euler config (leading), negative prompt\n"
        "  None (zeros: `force_zeros_for_empty_prompt`); `traj.lightning.*`: "
        f"{LIGHTNING_STEPS} steps, trailing, guidance 0 (no uncond pass).\n"
        "  Both from `traj.init_latent`, 16×16 image; `image` = `vae.decode(final / 0.13025)`, `image_u8` the PIL output.\n\n"
        "| key | dtype | shape |\n|---|---|---|\n" + rows + "\n")
    print(f"sdxl_fixtures: wrote {out} in {time.time() - start:.1f} s; max activation {meta['activation_check']}", file=sys.stderr)


if __name__ == "__main__":
    main()
