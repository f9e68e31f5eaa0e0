//! One generation, stage by stage: text → sampling (with the image encodes that start
//! it) → decode → the finished image. Each stage holds its weights only while it runs,
//! so a stage's memory is gone before the next one loads its own.
use std::time::Instant;

use super::control::Steering;
use super::infotext;
use super::lora::{Part, RequestLora};
use super::preview::Previewer;
use super::text::Prompts;
use super::{
    check_cancel, guidance_embedding, to_rgb8, Guidance, Image, Pipeline, Request, Stage,
    FORCED_TILE,
};
use crate::budget::Plan;
use crate::error::{Error, Result};
use crate::formats::Checkpoint;
use crate::model::{taesd, unet, vae, Planes, Weights};
use crate::network::controlnet::CONTROL_PREFIX;
use crate::network::{UNET_PREFIX, VAE_PREFIX};
use crate::sample;

fn is_unet(name: &str) -> bool {
    name.starts_with(UNET_PREFIX)
}

/// What the text stage hands on: the conditioning and what made it.
struct Text {
    prompts: Prompts,
    loras: Vec<RequestLora>,
    /// `[branch][token][context_dim]`: `[uncond, cond]` when guided.
    context: Vec<f32>,
    /// `label_emb`'s input per branch (SDXL).
    y: Option<Vec<f32>>,
    guided: bool,
}

/// The sampled latent and the strength it was sampled at.
struct Sampled {
    latent: Vec<f32>,
    strength: f64,
}

/// What the text and sampling stages hand on to the decode.
struct Sampling {
    text: Text,
    sampled: Sampled,
    /// The request's TAESD decoder where the previews needed it during sampling.
    taesd: Option<Weights<'static>>,
    latent_size: (usize, usize),
    /// Seconds of the text and the sampling stage.
    seconds: [f64; 2],
}

/// Decoded pixels, planar `[3][h][w]`, in [0, 1] when `unit` (TAESD) else in [-1, 1].
struct Decoded {
    pixels: Vec<f32>,
    unit: bool,
}

impl Pipeline {
    /// `req` sampled and not decoded: the latent (`[C][H/f][W/f]`, UNet units), the
    /// parameters its image would have, and the text and sampling seconds (the
    /// first pass of a latent hires fix).
    pub(super) fn sample_only(
        &self,
        req: &Request,
        memory: &Plan,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<(Vec<f32>, String, [f64; 3])> {
        let s = self.text_and_sampling(req, memory, progress)?;
        let parameters = self.parameters(req, &s.text, s.sampled.strength);
        Ok((
            s.sampled.latent,
            parameters,
            [s.seconds[0], s.seconds[1], 0.0],
        ))
    }

    /// The request checked, its text encoded and its latent sampled (the UNet
    /// released), with the TAESD decoder where the previews read it.
    fn text_and_sampling(
        &self,
        req: &Request,
        memory: &Plan,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Sampling> {
        let latent_size = self.validate(req)?;
        check_cancel(req.cancel.as_deref())?;
        let t0 = Instant::now();
        let text = self.text_stage(req)?;
        self.gguf.check_intact()?;
        progress(Stage::TextEncoded);
        check_cancel(req.cancel.as_deref())?;
        let t1 = Instant::now();
        let taesd = if req.decoding.preview_every > 0 {
            self.load_taesd(req)?
        } else {
            None
        };
        let sampled =
            self.sample_stage(req, memory, &text, taesd.as_ref(), latent_size, progress)?;
        self.gguf.release(is_unet);
        self.gguf.check_intact()?;
        check_cancel(req.cancel.as_deref())?;
        let seconds = [(t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64()];
        progress(Stage::Sampled);
        Ok(Sampling {
            text,
            sampled,
            taesd,
            latent_size,
            seconds,
        })
    }

    /// The request's TAESD decoder, if it has one.
    fn load_taesd(&self, req: &Request) -> Result<Option<Weights<'static>>> {
        let Some(path) = &req.decoding.taesd else {
            return Ok(None);
        };
        Ok(Some(Weights::from_checkpoint_half(
            &Checkpoint::open(path)?,
            &self.backend,
        )?))
    }

    /// The infotext of `req`'s image.
    fn parameters(&self, req: &Request, text: &Text, strength: f64) -> String {
        let name = self
            .gguf
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let embeddings = text
            .prompts
            .used_embeddings()
            .into_iter()
            .filter_map(|e| self.embeddings.list.get(e))
            .map(|e| (e.names.first().map_or("", String::as_str), e.path.as_path()))
            .collect();
        infotext::Record {
            req,
            width: req.width,
            height: req.height,
            strength,
            model_hash: &self.model_hash,
            model_name: &name,
            loras: &text.loras,
            embeddings,
        }
        .render()
    }

    /// [`Pipeline::generate`] with the memory choices of `memory` (from
    /// [`Pipeline::plan`], possibly adjusted: e.g. tiles forced for a test).
    pub fn generate_planned(
        &self,
        req: &Request,
        memory: &Plan,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Image> {
        let Sampling {
            text,
            sampled,
            mut taesd,
            latent_size,
            seconds,
        } = self.text_and_sampling(req, memory, progress)?;
        let t2 = Instant::now();
        // The TAESD decoder is read once: before sampling where it drew the previews,
        // else for the decode alone.
        if taesd.is_none() {
            taesd = self.load_taesd(req)?;
        }
        let decoded = self.decode_stage(
            req,
            memory,
            &sampled.latent,
            taesd.as_ref(),
            latent_size,
            progress,
        )?;
        self.gguf.release(|n| n.starts_with(VAE_PREFIX));
        self.gguf.check_intact()?;
        progress(Stage::Decoded);
        let timings = [seconds[0], seconds[1], t2.elapsed().as_secs_f64()];
        Ok(self.finish(req, &text, &sampled, decoded, timings))
    }

    /// The prompts through the text encoders, with the request's LoRAs on them.
    fn text_stage(&self, req: &Request) -> Result<Text> {
        let guided = self.guided(req);
        let prompts = self.prompts(req)?;
        let loras = self.request_loras(req)?;
        let cond = self.encode_prompts(req, &prompts, &loras)?;
        let y = match &cond.pooled {
            Some(pooled) => Some(self.vector_conditioning(req, pooled, guided)?),
            None => None,
        };
        Ok(Text {
            prompts,
            loras,
            context: cond.context,
            y,
            guided,
        })
    }

    /// The starting latent (image encodes first, for img2img and inpainting), then the
    /// sampler's steps through the UNet with classifier-free guidance.
    fn sample_stage(
        &self,
        req: &Request,
        memory: &Plan,
        text: &Text,
        taesd: Option<&Weights<'static>>,
        (lw, lh): (usize, usize),
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Sampled> {
        let cfg = &self.config;
        // One generator for the image encodes, the initial latent and then every
        // ancestral step, in the order diffusers draws them, so the torch generator
        // reproduces its images.
        let mut rng = req.sampling.rng.make(req.seed);
        let sched = req.sampling.training_schedule(cfg);
        let settings = req.sampling.settings(cfg);
        let strength = req.strength();
        let plan = req.sampling.plan(cfg, &sched, req.steps, strength);
        if plan.timesteps.is_empty() {
            return Err(Error::Invalid(format!(
                "strength {strength} of {} steps leaves no step to run: raise either",
                req.steps
            )));
        }
        // Image encodes are their own stage, before the UNet's weights come in. They run
        // in the decode's tiles, but not in its bands (full width without overlaps, which
        // an encoder's tiles need): then whole, as planned, or in the forced tiles.
        let encode_tiling = match memory.decode_keep {
            Some(_) => (req.decoding.vae_tiling && FORCED_TILE.clamp(lw, lh).cuts(lw, lh))
                .then_some(FORCED_TILE),
            None => memory.tiling,
        };
        let start = self.start(req, lw, lh, encode_tiling, rng.as_mut())?;
        check_cancel(req.cancel.as_deref())?;
        // The UNet's weights, graph and compute buffer are dropped when this returns.
        let uw = self.stage(
            is_unet,
            |n| self.repack && !memory.stream_unet && is_unet(n) && n.ends_with(".weight"),
            |d| &d.unet,
        )?;
        // Copied weights are not read from the mapping again.
        self.gguf.release(|n| uw.is_copied(n));
        // One graph for the whole run: cond and uncond as a batch of 2 when guided,
        // unless the plan splits them to halve the compute buffer.
        let branches = if text.guided { 2 } else { 1 };
        let batch = if memory.split_guidance { 1 } else { branches };
        let adapters = self.adapters(&text.loras, Part::Unet, is_unet)?;
        let shape = unet::Shape {
            width: lw,
            height: lh,
            batch,
            tokens: self.context_tokens(&text.prompts),
            control: !req.controls.is_empty(),
        };
        let runner = unet::Runner::new(&uw, &cfg.unet, shape, self.attention, adapters.as_ref())?;
        let controls = self.fit_controls(req)?;
        let control_weights = controls
            .iter()
            .map(|c| {
                // As the UNet's: q4_0/q4_K matrices in ggml's repacked layout.
                Weights::load_repacked(
                    &c.net.gguf,
                    |n| n.starts_with(CONTROL_PREFIX),
                    |n| self.repack && n.ends_with(".weight"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let steering = if controls.is_empty() {
            None
        } else {
            Some(Steering::new(
                &controls,
                &control_weights,
                shape,
                self.attention,
                &plan.timesteps,
            )?)
        };
        let (control_bytes, control_flops) = steering.as_ref().map_or((0, 0.0), Steering::cost);
        // Each ControlNet runs once per branch it acts on (twice when guided).
        progress(Stage::Sampling {
            unet_flops: runner.flops * (branches / batch) as f64 + control_flops * branches as f64,
            compute_bytes: runner.buffer_bytes + control_bytes,
        });
        let embedded = cfg
            .unet
            .time_cond_proj_dim
            .map(|dim| guidance_embedding(req.cfg_scale - 1.0, dim));
        let mut model = Guidance {
            runner: &runner,
            pipe: self,
            context: &text.context,
            y: text.y.as_deref(),
            scale: req.cfg_scale,
            rescale: req.sampling.guidance_rescale,
            guided: text.guided,
            split: memory.split_guidance,
            extra: start.extra.as_deref(),
            embedded: embedded.as_deref(),
            cancel: req.cancel.as_deref(),
            steering: steering.as_ref(),
        };
        let total = plan.timesteps.len();
        let x = start.latent(&plan, strength);
        let mut den = sample::Denoiser::new(&mut model, cfg.prediction, &sched, &plan)
            .with_clip(req.sampling.clip(cfg));
        let mut noise_src = req.sampling.noise(req.seed, rng.as_mut());
        let previewer = match req.decoding.preview_every {
            0 => None,
            _ => Some(Previewer::new(self, taesd, lw, lh)?),
        };
        let trajectory = sample::sample(
            &mut den,
            req.sampling.sampler,
            &settings,
            &plan,
            x,
            noise_src.as_mut(),
            &mut |i, x, denoised| {
                start.blend(&plan, i, x);
                progress(Stage::Step { done: i + 1, total });
                let due = (i + 1) % req.decoding.preview_every.max(1) == 0 || i + 1 == total;
                if let Some(p) = previewer.as_ref().filter(|_| due && !denoised.is_empty()) {
                    // A preview is a courtesy: its failure must not cost the image.
                    match p.draw(denoised) {
                        Ok(image) => progress(Stage::Preview {
                            done: i + 1,
                            total,
                            image: &image,
                        }),
                        Err(e) => log::warn!("no preview after step {}: {e}", i + 1),
                    }
                }
            },
        )?;
        let latent = trajectory
            .into_iter()
            .last()
            .ok_or_else(|| Error::Invalid("no sampling steps".into()))?;
        Ok(Sampled { latent, strength })
    }

    /// The latent through the VAE's decoder (or the request's TAESD decoder), in tiles
    /// where the plan says.
    fn decode_stage(
        &self,
        req: &Request,
        memory: &Plan,
        latent: &[f32],
        taesd: Option<&Weights<'static>>,
        (lw, lh): (usize, usize),
        progress: &mut dyn FnMut(Stage),
    ) -> Result<Decoded> {
        if let Some(w) = taesd {
            let pixels = match memory.tiling {
                Some(t) => {
                    taesd::decode_tiled(w, Planes::single(latent, lw, lh), t, &self.backend)?
                }
                None => taesd::decode(w, Planes::single(latent, lw, lh), &self.backend)?,
            };
            return Ok(Decoded { pixels, unit: true });
        }
        let w = self.vae_weights()?;
        let cfg = &self.vae_config;
        let pixels = match memory.tiling {
            Some(t) => vae::decode_tiled(
                &w,
                cfg,
                Planes::single(latent, lw, lh),
                t,
                req.decoding.vae_tile_stats,
                memory.decode_keep,
                &self.backend,
                &mut |done, total| {
                    progress(Stage::Decoding { done, total });
                    check_cancel(req.cancel.as_deref())
                },
            )?,
            None => vae::decode(&w, cfg, Planes::single(latent, lw, lh), &self.backend)?,
        };
        Ok(Decoded {
            pixels,
            unit: false,
        })
    }

    /// The 8-bit image: the init image pasted back outside an inpainting mask, and the
    /// parameters that made it.
    fn finish(
        &self,
        req: &Request,
        text: &Text,
        sampled: &Sampled,
        decoded: Decoded,
        timings: [f64; 3],
    ) -> Image {
        let (w, h) = (req.width, req.height);
        let mut rgb = to_rgb8(&decoded.pixels, w * h, decoded.unit);
        if let Some((init, mask)) = req
            .init
            .as_ref()
            .filter(|i| i.overlay)
            .and_then(|i| Some((&i.canvas, i.canvas.mask.as_ref()?)))
        {
            for (i, &m) in mask.iter().enumerate() {
                for c in 0..3 {
                    let (a, b) = (init.rgb[i * 3 + c] as f32, rgb[i * 3 + c] as f32);
                    rgb[i * 3 + c] = (a + m * (b - a)).round() as u8;
                }
            }
        }
        let parameters = self.parameters(req, text, sampled.strength);
        Image {
            width: w,
            height: h,
            rgb,
            parameters,
            timings,
        }
    }
}
