#!/usr/bin/env python3
"""Trains sdrs's demo model: a tiny Stable Diffusion 1.x-architecture text-to-image
model on the procedural shapes data (tools/demo/shapes.py), then its LCM-distilled
few-step variant, and writes both as diffusers folders for `sdrs convert`.

    tools/reference/setup.sh                                # the PyTorch venv (once)
    /work/venv-ref/bin/python tools/demo/train.py --work /work/demo-train
    tools/demo/build.sh /work/demo-train                    # convert, evaluate, install

Stages (each resumes from the work folder when its output exists; `--redo STAGE`):

1. data  - N training samples from the shapes training stream (seeded; held-out and
           fixture seeds cannot occur), tokenized with the real CLIP BPE tokenizer.
2. vae   - an AutoencoderKL (4 latent channels, 8x downsampling) trained from scratch
           (L1 + MSE + a small KL term, as LDM's first stage without the GAN/LPIPS
           terms, which flat synthetic shapes do not need); then every sample is
           encoded once and the latent scaling factor is set to 1/std, as LDM did to
           get SD's 0.18215.
3. base  - CLIP text encoder and UNet trained jointly from scratch on the cached
           latents: v-prediction on SD 1.x's scaled-linear schedule rescaled to zero
           terminal SNR (Lin et al. 2024, arXiv:2305.08891), loss weighted in x0 terms
           by min(1 + SNR, 5) (the min-SNR cap of Hang et al. 2023, arXiv:2303.09556, on
           v-prediction's own 1 + SNR), 10% empty captions for classifier-free
           guidance, EMA weights. Why: with SD's own schedule the last step keeps
           sqrt(0.0047) of the latent, enough of a 8x8 blob to steer where the shape
           lands, and epsilon loss weighs the pure-noise steps (where layout is decided)
           by SNR ~ 0; the first recipe learnt colour, shape and size but drew shapes
           wherever the seed's noise put them (position at chance).
4. lcm   - latent consistency distillation (Luo et al. 2023, arXiv:2310.04378,
           Algorithm 1) in v-prediction terms: student = base UNet + a
           zero-initialised guidance embedding (`time_cond_proj_dim`), teacher = base
           UNet with CFG w ~ U[w_min, w_max], one DDIM step of skip 20 on a 50-step
           grid, target network as EMA of the student, pseudo-Huber loss, boundary
           scalings with timestep_scaling 10 (LCMScheduler's); plus a denoising term
           weighted by SNR/(1 + SNR). Short (500 steps) and at low guidance: longer
           runs, or a teacher at CFG up to 4, lost shape accuracy (see the model card).
5. decoder - the VAE decoder fine-tuned alone on the cached latents (the encoder, so
           every latent the UNet learnt, is unchanged): the steps the first stage
           could not afford, with an edge term (L1 of pixel differences) for the
           outlines that decide a small shape's class.
6. export - `demo-base/` and `demo-lcm/` diffusers folders (published SD layout:
           `text_model.` prefix, vocab.json + merges.txt tokenizer) in `<work>/out`.

Deterministic from `--seed` (torch CPU kernels are deterministic for a fixed thread
count; the data stream is our own splitmix64). Runs on the CPU in ~100 minutes on two
cores; `--device cuda` uses a GPU where there is one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tools" / "reference"))
from shapes import Grammar, train_stream  # noqa: E402

SIZE = 64
LATENT = SIZE // 8
# SD 1.x's noise schedule (the published scheduler configs), rescaled to zero terminal SNR.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                rescale_betas_zero_snr=True)
PREDICTION = "v_prediction"
LOSS_CAP = 5.0  # x0-space loss weight min(1 + SNR, LOSS_CAP)

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    # Four levels = 8x downsampling as in SD; 32 groups (SD's, fixed in sdrs) needs >= 32 channels.
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=SIZE,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
UNET = dict(
    sample_size=LATENT,
    in_channels=4,
    out_channels=4,
    # SD 1.x's block pattern (attention on every level but the deepest), three levels
    # instead of four because the latent is only 8x8.
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128),
    # One ResNet (+ transformer) per level where SD has two: half the training time.
    layers_per_block=1,
    norm_num_groups=32,
    cross_attention_dim=TEXT["hidden_size"],
    attention_head_dim=4,  # a head count in diffusers, as SD 1.x's 8
    use_linear_projection=False,
    flip_sin_to_cos=True,
    freq_shift=0,
)
LCM_COND_DIM = 64
DDIM_STEPS = 50  # the distillation grid (LCM's "original_inference_steps")
TIMESTEP_SCALING = 10.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Journal:
    """`<work>/journal.json`: what each stage did and how long it took (the model card reads it)."""

    def __init__(self, work: Path):
        self.path = work / "journal.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def put(self, stage: str, **kv) -> None:
        self.data[stage] = kv
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


# ---------------------------------------------------------------------------- data


def tokenizer(work: Path):
    from make_fixtures import write_tokenizer
    from transformers import CLIPTokenizer

    d = work / "tokenizer"
    if not (d / "vocab.json").exists():
        write_tokenizer(d, REPO.parent / "shared" / "data" / "clip" / "hf", "<|endoftext|>")
    return CLIPTokenizer.from_pretrained(d)


def stage_data(args, work: Path, journal: Journal) -> None:
    t0 = time.time()
    g = Grammar.load()
    tok = tokenizer(work)
    n = args.samples
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i, s in enumerate(train_stream(g, run_seed=args.seed, size=SIZE)):
        if i == n:
            break
        images[i] = s.image
        captions.append(s.caption)
    distinct = sorted(set(captions))
    ids = tok(distinct, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    index = {c: k for k, c in enumerate(distinct)}
    cap_idx = np.array([index[c] for c in captions], np.int32)
    empty = tok([""], padding="max_length", max_length=77, return_tensors="np").input_ids[0]
    np.savez(work / "data.npz", images=images, caption_ids=ids.astype(np.int32), caption_index=cap_idx,
             empty_ids=empty.astype(np.int32))
    (work / "captions.json").write_text(json.dumps(captions[:200], indent=0) + "\n")
    journal.put("data", samples=n, distinct_captions=len(distinct), seconds=round(time.time() - t0, 1))
    log(f"data: {n} samples, {len(distinct)} distinct captions")


def load_data(work: Path):
    d = np.load(work / "data.npz")
    return {k: d[k] for k in d.files}


# ---------------------------------------------------------------------------- vae


def to_pixels(images_u8: np.ndarray, idx, device) -> torch.Tensor:
    x = torch.from_numpy(images_u8[idx]).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def descend(opt, loss, params) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def stage_vae(args, work: Path, journal: Journal) -> None:
    from diffusers import AutoencoderKL

    t0 = time.time()
    data = load_data(work)
    images = data["images"]
    n = len(images)
    gen = seeded(args, 2)
    vae = AutoencoderKL(**VAE).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    steps, bs = args.vae_steps, args.vae_batch
    losses = []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, args.vae_lr, 100))
        idx = torch.randint(0, n, (bs,), generator=gen).numpy()
        x = to_pixels(images, idx, args.device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(args.device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_kl * kl
        descend(opt, loss, vae.parameters())
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    # Encode everything once: the UNet trains on cached posterior means and stds.
    means, stds, errs = [], [], []
    with torch.no_grad():
        for i in range(0, n, 256):
            x = to_pixels(images, np.arange(i, min(n, i + 256)), args.device)
            post = vae.encode(x).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
            if i < 512:
                errs.append((vae.decode(post.mean).sample.clamp(-1, 1) - x).abs().mean().item() * 127.5)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    torch.save(vae.state_dict(), work / "vae.pt")
    torch.save({"mean": mean.half(), "std": std.half()}, work / "latents.pt")
    journal.put("vae", steps=steps, batch=bs, final_loss=round(float(np.mean(losses[-100:])), 5),
                scaling_factor=scale, recon_mae_levels=round(float(np.mean(errs)), 3),
                seconds=round(time.time() - t0, 1))
    log(f"vae: scaling factor {scale:.4f}, reconstruction MAE {np.mean(errs):.2f} levels")


def load_vae(work: Path):
    """The trained autoencoder, with the fine-tuned decoder when that stage has run."""
    from diffusers import AutoencoderKL

    j = Journal(work).data["vae"]
    vae = AutoencoderKL(**VAE, scaling_factor=j["scaling_factor"])
    vae.load_state_dict(torch.load(work / "vae.pt"))
    if (work / "decoder.pt").exists():
        vae.load_state_dict(torch.load(work / "decoder.pt"), strict=False)
    return vae.eval()


def edge_loss(a, b):
    """L1 between the images' horizontal and vertical differences: weighs the outlines,
    which decide a small shape's class (corners, taper) and are few of the pixels."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def stage_decoder(args, work: Path, journal: Journal) -> None:
    """Fine-tunes the VAE decoder alone on the cached latents. The encoder, hence every
    latent the UNet was trained on, stays as it is; the decoder gets the steps the joint
    training could not afford, with an edge term (sharper corners, no blotches)."""
    from diffusers import AutoencoderKL

    t0 = time.time()
    data = load_data(work)
    images = data["images"]
    lat = torch.load(work / "latents.pt")
    n = len(images)
    gen = seeded(args, 5)
    vae = AutoencoderKL(**VAE)
    vae.load_state_dict(torch.load(work / "vae.pt"))
    vae = vae.to(args.device)
    decoder = [p for n_, p in vae.named_parameters() if n_.startswith(("decoder.", "post_quant_conv."))]
    opt = torch.optim.AdamW(decoder, lr=args.decoder_lr, weight_decay=0.0)
    steps, bs = args.decoder_steps, args.vae_batch
    losses = []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, args.decoder_lr, 50))
        idx = torch.randint(0, n, (bs,), generator=gen)
        z = posterior_sample(lat, idx, gen, args.device)
        x = to_pixels(images, idx.numpy(), args.device)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + edge_loss(rec, x)
        descend(opt, loss, decoder)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        x = to_pixels(images, np.arange(512), args.device)
        err = (vae.decode(lat["mean"][:512].float().to(args.device)).sample.clamp(-1, 1) - x).abs().mean().item() * 127.5
    torch.save({k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}, work / "decoder.pt")
    journal.put("decoder", steps=steps, batch=bs, lr=args.decoder_lr, final_loss=round(float(np.mean(losses[-100:])), 5),
                recon_mae_levels=round(err, 3), seconds=round(time.time() - t0, 1))
    log(f"decoder: reconstruction MAE {err:.2f} levels")


# ---------------------------------------------------------------------------- diffusion


class Schedule:
    """SD's scaled-linear schedule with zero terminal SNR (Lin et al. 2024, alg. 1: shift
    and scale sqrt(alpha_bar) so step 0 is unchanged and step T-1 is 0), and the
    v-prediction conversions (Salimans & Ho 2022, arXiv:2202.00512)."""

    def __init__(self, device):
        betas = torch.linspace(SCHEDULE["beta_start"] ** 0.5, SCHEDULE["beta_end"] ** 0.5, 1000,
                               dtype=torch.float64) ** 2
        s = torch.cumprod(1 - betas, 0).sqrt()
        if SCHEDULE["rescale_betas_zero_snr"]:  # the flag the exported scheduler configs carry
            s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        self.ab = (s * s).float().to(device)
        self.snr = self.ab / (1 - self.ab)

    def coeffs(self, t):
        a = self.ab[t].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def noised(self, x0, noise, t):
        a, s = self.coeffs(t)
        return a * x0 + s * noise

    def velocity(self, x0, noise, t):
        a, s = self.coeffs(t)
        return a * noise - s * x0

    def x0_from_v(self, x, v, t):
        a, s = self.coeffs(t)
        return a * x - s * v

    def eps_from_v(self, x, v, t):
        a, s = self.coeffs(t)
        return s * x + a * v


def posterior_sample(lat, idx, gen, device):
    """Draws from the cached VAE posteriors of samples `idx` (unscaled latents)."""
    m, s = lat["mean"][idx].float(), lat["std"][idx].float()
    return (m + s * torch.randn(m.shape, generator=gen)).to(device)


def latent_batch(lat, idx, gen, device):
    """UNet inputs: posterior draws times the scaling factor."""
    return posterior_sample(lat, idx, gen, device) * lat["scale"]


def latent_set(work: Path):
    """The cached training latents (with the scaling factor) and token ids per sample."""
    data = load_data(work)
    lat = torch.load(work / "latents.pt")
    lat["scale"] = Journal(work).data["vae"]["scaling_factor"]
    ids_all = torch.from_numpy(data["caption_ids"]).long()
    cap_idx = torch.from_numpy(data["caption_index"]).long()
    return lat, ids_all, cap_idx, torch.from_numpy(data["empty_ids"]).long()


def seeded(args, stream: int) -> torch.Generator:
    """Seeds torch (weight init) and returns the stage's own generator (batches, noise)."""
    torch.manual_seed(args.seed * 1000 + stream)
    return torch.Generator().manual_seed(args.seed * 1000 + stream)


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def stage_base(args, work: Path, journal: Journal) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.time()
    lat, ids_all, cap_idx, empty = latent_set(work)
    n = len(cap_idx)
    gen = seeded(args, 3)
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).to(args.device)
    unet = UNet2DConditionModel(**UNET).to(args.device)
    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.base_lr, weight_decay=0.01)
    sched = Schedule(args.device)
    steps, bs = args.base_steps, args.base_batch
    losses = []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, args.base_lr, 200))
        idx = torch.randint(0, n, (bs,), generator=gen)
        ids = ids_all[cap_idx[idx]]
        drop = torch.rand(bs, generator=gen) < 0.1
        ids[drop] = empty
        x0 = latent_batch(lat, idx, gen, args.device)
        noise = torch.randn(x0.shape, generator=gen).to(args.device)
        t = torch.randint(0, 1000, (bs,), generator=gen).to(args.device)
        ctx = text(ids.to(args.device)).last_hidden_state
        v = unet(sched.noised(x0, noise, t), t, ctx).sample
        # v-loss is (1 + SNR) x the x0 loss: cap that at LOSS_CAP.
        w = torch.clamp(1 + sched.snr[t], max=LOSS_CAP) / (1 + sched.snr[t])
        loss = (w * ((v - sched.velocity(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))).mean()
        descend(opt, loss, params)
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_text, text, decay)
        ema_update(ema_unet, unet, decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"base {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)")
        if step % 2000 == 1999:
            torch.save({"text": ema_text.state_dict(), "unet": ema_unet.state_dict()}, work / "base.pt")
    torch.save({"text": ema_text.state_dict(), "unet": ema_unet.state_dict()}, work / "base.pt")
    journal.put("base", steps=steps, batch=bs, lr=args.base_lr, ema=args.ema, prediction=PREDICTION,
                zero_terminal_snr=SCHEDULE["rescale_betas_zero_snr"], loss_cap=LOSS_CAP,
                final_loss=round(float(np.mean(losses[-200:])), 5), seconds=round(time.time() - t0, 1))


def load_base(work: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = torch.load(work / "base.pt")
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    text.load_state_dict(sd["text"])
    unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(sd["unet"])
    return text.eval(), unet.eval()


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight (VDM, arXiv:2107.00630; as
    diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding)."""
    w = w * 1000.0
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    e = w[:, None].float() * f[None, :]
    return torch.cat([torch.sin(e), torch.cos(e)], dim=1)


def boundary(t: torch.Tensor, sigma_data: float = 0.5):
    """LCM's c_skip and c_out (consistency-model boundary condition) at timestep t."""
    s = t.float() * TIMESTEP_SCALING
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def stage_lcm(args, work: Path, journal: Journal) -> None:
    from diffusers import UNet2DConditionModel

    t0 = time.time()
    lat, ids_all, cap_idx, empty = latent_set(work)
    n = len(cap_idx)
    gen = seeded(args, 4)
    text, teacher = load_base(work)
    text, teacher = text.to(args.device).requires_grad_(False), teacher.to(args.device).requires_grad_(False)
    student = UNet2DConditionModel(**UNET, time_cond_proj_dim=LCM_COND_DIM).to(args.device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lcm_lr, weight_decay=0.0)
    sched = Schedule(args.device)
    skip = 1000 // DDIM_STEPS
    with torch.no_grad():
        uncond = text(empty[None].to(args.device)).last_hidden_state
    steps, bs = args.lcm_steps, args.lcm_batch
    losses = []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, args.lcm_lr, 100))
        idx = torch.randint(0, n, (bs,), generator=gen)
        ids = ids_all[cap_idx[idx]].to(args.device)
        x0 = latent_batch(lat, idx, gen, args.device)
        noise = torch.randn(x0.shape, generator=gen).to(args.device)
        k = torch.randint(0, DDIM_STEPS, (bs,), generator=gen)
        t = ((k + 1) * skip - 1).to(args.device)
        t_prev = torch.clamp(t - skip, min=0)
        w = (args.w_min + (args.w_max - args.w_min) * torch.rand(bs, generator=gen)).to(args.device)
        w_emb = guidance_embedding(w, LCM_COND_DIM).to(args.device)
        with torch.no_grad():
            ctx = text(ids).last_hidden_state
        x_t = sched.noised(x0, noise, t)
        cs, co = boundary(t)
        v_s = student(x_t, t, ctx, timestep_cond=w_emb).sample
        pred = cs * x_t + co * sched.x0_from_v(x_t, v_s, t)
        with torch.no_grad():
            v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               torch.cat([ctx, uncond.expand(bs, -1, -1)])).sample.chunk(2)
            wv = w.view(-1, 1, 1, 1)
            # CFG on both the x0 and the epsilon estimate (as diffusers' LCM distillation script).
            x0_c, x0_u = sched.x0_from_v(x_t, v_c, t), sched.x0_from_v(x_t, v_u, t)
            e_c, e_u = sched.eps_from_v(x_t, v_c, t), sched.eps_from_v(x_t, v_u, t)
            x0_g = x0_c + wv * (x0_c - x0_u)
            eps_g = e_c + wv * (e_c - e_u)
            a_prev, s_prev = sched.coeffs(t_prev)
            x_prev = a_prev * x0_g + s_prev * eps_g
            v_tg = target(x_prev, t_prev, ctx, timestep_cond=w_emb).sample
            cs_p, co_p = boundary(t_prev)
            tgt = cs_p * x_prev + co_p * sched.x0_from_v(x_prev, v_tg, t_prev)
        c = 0.001
        huber = lambda a, b: (torch.sqrt((a - b) ** 2 + c * c) - c).mean(dim=(1, 2, 3))  # noqa: E731
        loss = huber(pred, tgt).mean()
        if args.lcm_anchor:
            # Anchor the consistency function to the data where the two agree: at low noise
            # the ODE endpoint of x_t is the clean latent itself, so a denoising term
            # weighted by the signal fraction SNR/(1 + SNR) (0 at pure noise, where it
            # would pull towards the posterior mean instead) keeps the late steps of a
            # multi-step run sharp. Consistency trajectory models regularise the same way
            # with denoising score matching (Kim et al. 2023, arXiv:2310.02279).
            frac = sched.snr[t] / (1 + sched.snr[t])
            loss = loss + args.lcm_anchor * (frac * huber(pred, x0)).mean()
        descend(opt, loss, student.parameters())
        ema_update(target, student, args.lcm_ema)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"lcm {step}/{steps} loss {np.mean(losses[-100:]):.5f} ({time.time() - t0:.0f} s)")
        if args.lcm_snapshots and (step + 1) % args.lcm_snapshots == 0 and step + 1 < steps:
            # Intermediate target networks, to measure how few-step quality grows with training.
            torch.save(target.state_dict(), work / f"lcm-{step + 1}.pt")
    torch.save(target.state_dict(), work / "lcm.pt")
    journal.put("lcm", steps=steps, batch=bs, lr=args.lcm_lr, w_range=[args.w_min, args.w_max],
                target_ema=args.lcm_ema, anchor=args.lcm_anchor,
                final_loss=round(float(np.mean(losses[-200:])), 6),
                seconds=round(time.time() - t0, 1))


# ---------------------------------------------------------------------------- export


def stage_export(args, work: Path, journal: Journal) -> None:
    from diffusers import (EulerDiscreteScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    out = work / "out"
    vae = load_vae(work)
    text, unet = load_base(work)
    lcm = UNet2DConditionModel(**UNET, time_cond_proj_dim=LCM_COND_DIM)
    lcm.load_state_dict(torch.load(work / "lcm.pt"))
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
    # Trailing spacing: with zero terminal SNR the first step must be at t = T-1 (Lin et al. 2024).
    base_sched = EulerDiscreteScheduler(**SCHEDULE, prediction_type=PREDICTION, timestep_spacing="trailing", steps_offset=1)
    lcm_sched = LCMScheduler(**SCHEDULE, prediction_type=PREDICTION, original_inference_steps=DDIM_STEPS,
                             timestep_scaling=TIMESTEP_SCALING, steps_offset=1, clip_sample=False, set_alpha_to_one=True)
    for name, pipe in (
        ("demo-base", StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=base_sched,
                                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
        ("demo-lcm", LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=lcm, scheduler=lcm_sched,
                                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    ):
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        pipe.save_pretrained(d, safe_serialization=True)
        # The published SD layout: vocab.json + merges.txt, and `text_model.`-prefixed names
        # (transformers 5 saves neither; see tools/reference/make_fixtures.py).
        shutil.rmtree(d / "tokenizer")
        shutil.copytree(work / "tokenizer", d / "tokenizer")
        te = d / "text_encoder" / "model.safetensors"
        w = load_file(str(te))
        if not all(k.startswith("text_model.") for k in w):
            save_file({f"text_model.{k}": v for k, v in w.items()}, str(te), metadata={"format": "pt"})
        if args.preview:
            preview(pipe, d / "preview.png", lcm=name.endswith("lcm"))
        log(f"export: {d}")
    params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "unet_lcm": sum(p.numel() for p in lcm.parameters()),
        "text_encoder": sum(p.numel() for p in text.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
    }
    journal.put("export", parameters=params, configs={"unet": UNET, "text_encoder": TEXT, "vae": VAE,
                                                      "lcm_cond_dim": LCM_COND_DIM})


def preview(pipe, path: Path, lcm: bool) -> None:
    """A grid of four prompts from diffusers itself: a check on the export independent of sdrs."""
    prompts = ["a large red circle on the left on a blue background", "a small yellow square at the top on a black background",
               "a large white triangle in the center on a green background", "a small magenta circle at the bottom on a cyan background"]
    gen = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=4, guidance_scale=8.5) if lcm else dict(num_inference_steps=20, guidance_scale=7.0)
    pipe.set_progress_bar_config(disable=True)
    imgs = pipe(prompts, height=SIZE, width=SIZE, generator=gen, output_type="np", **kw).images
    grid = np.concatenate(list((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)), axis=1)
    from shapes import write_png
    write_png(path, grid)


# ---------------------------------------------------------------------------- main

STAGES = {"data": ("data.npz", stage_data), "vae": ("latents.pt", stage_vae), "base": ("base.pt", stage_base),
          "lcm": ("lcm.pt", stage_lcm), "decoder": ("decoder.pt", stage_decoder), "export": ("out/demo-lcm/model_index.json", stage_export)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="work folder (resumable; keep it outside the repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help="comma-separated stages to run (default: all, resuming)")
    p.add_argument("--redo", default="", help="comma-separated stages to run even when their output exists")
    p.add_argument("--samples", type=int, default=30000)
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--decoder-steps", type=int, default=3000)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--base-steps", type=int, default=4500)
    p.add_argument("--base-batch", type=int, default=64)
    p.add_argument("--base-lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--lcm-steps", type=int, default=500)
    p.add_argument("--lcm-batch", type=int, default=64)
    p.add_argument("--lcm-lr", type=float, default=2e-4)
    p.add_argument("--lcm-ema", type=float, default=0.95)
    p.add_argument("--lcm-anchor", type=float, default=1.0,
                   help="weight of the LCM stage's denoising term (the student's x0 against the data latent)")
    p.add_argument("--lcm-snapshots", type=int, default=0, help="also save the LCM target network every N steps (lcm-N.pt)")
    # Low guidance: on these shapes the base model draws its best outlines at CFG 1-2, and
    # a teacher at higher CFG taught the student halos and tinted backgrounds.
    p.add_argument("--w-min", type=float, default=0.0, help="CFG weight range of distillation (guidance scale - 1)")
    p.add_argument("--w-max", type=float, default=1.0)
    p.add_argument("--preview", action="store_true", help="also render a diffusers preview grid per model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    journal = Journal(args.work)
    only = args.only.split(",") if args.only else list(STAGES)
    redo = set(filter(None, args.redo.split(",")))
    for name in only:
        out, fn = STAGES[name]
        if (args.work / out).exists() and name not in redo:
            log(f"{name}: done ({out} exists)")
            continue
        log(f"{name}: start")
        fn(args, args.work, journal)
    journal.put("run", argv=sys.argv[1:], torch=torch.__version__, threads=args.threads, device=args.device,
                **{k: v for k, v in journal.data.get("run", {}).items() if k not in ("argv", "torch", "threads", "device")})


if __name__ == "__main__":
    main()
