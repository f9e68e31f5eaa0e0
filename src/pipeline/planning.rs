//! A run's memory plan: every stage's weights, compute buffer and buffers measured
//! from its graphs (built, never run), then the choices that fit the budget.
use super::control::residual_sizes;
use super::lora::Part;
use super::{Pipeline, Request, FORCED_TILE};
use crate::budget::{self, Budget, Need, Plan};
use crate::error::Result;
use crate::formats::Checkpoint;
use crate::model::{clip, controlnet, taesd, unet, vae, Weights};
use crate::network::controlnet::CONTROL_PREFIX;
use crate::network::{self, UNET_PREFIX};

impl Pipeline {
    /// What `req` needs in memory, stage by stage, and the choices that fit it into
    /// the budget ([`Request::max_memory`], else [`Pipeline::max_memory`], else the
    /// cgroup's limit): an
    /// [`Error::OverBudget`] when nothing fits. Builds graphs only; runs nothing.
    pub fn plan(&self, req: &Request) -> Result<Plan> {
        let (lw, lh) = self.validate(req)?;
        let taesd = match &req.decoding.taesd {
            Some(path) => Some(Weights::from_checkpoint_half(
                &Checkpoint::open(path)?,
                &self.backend,
            )?),
            None => None,
        };
        // A given starting latent (the hires fix's latent upscale) needs no encode.
        let encode =
            req.init.as_ref().is_some_and(|i| i.latent.is_none()) && req.decoding.taesd.is_none();
        let prompts = self.prompts(req)?;
        let branches = if self.guided(req) { 2 } else { 1 };
        // Each stage's LoRA branches, read once for all the plans tried.
        let loras = self.request_loras(req)?;
        let text_adapters = self
            .config
            .text_encoders
            .iter()
            .map(|te| self.adapters(&loras, Part::Text, |n| n.starts_with(&te.prefix)))
            .collect::<Result<Vec<_>>>()?;
        let unet_adapters = self.adapters(&loras, Part::Unet, |n| n.starts_with(UNET_PREFIX))?;
        let budget = Budget::resolve(req.max_memory.or(self.max_memory));
        let stages = RunStages {
            budget,
            pipe: self,
            req,
            lw,
            lh,
            prompts: branches * prompts.count,
            tokens: self.context_tokens(&prompts),
            vectors: prompts.vectors,
            taesd,
            encode,
            text_adapters,
            unet_adapters,
        };
        let mut plan = budget::plan(&stages, self.guided(req), budget)?;
        let forced = FORCED_TILE.clamp(lw, lh);
        if req.decoding.vae_tiling && plan.tiling.is_none() && forced.cuts(lw, lh) {
            let need = budget::Stages::decode(&stages, Some(forced))?;
            if let Some(d) = plan.needs.iter_mut().find(|n| n.stage == "decode") {
                *d = need;
            }
            plan.tiling = Some(forced);
        }
        // A banded decode: the band height and checkpoints of least work that fit.
        if plan.tiling.is_some() && stages.banded() {
            if let Ok((t, need, keep)) = stages.bands(&stages.band_candidates(lh))? {
                if let Some(d) = plan.needs.iter_mut().find(|n| n.stage == "decode") {
                    *d = need;
                }
                plan.tiling = Some(t);
                plan.decode_keep = Some(keep);
            }
        }
        Ok(plan)
    }
}

/// Band heights (latents) a banded decode is planned with, up to the image's.
const BAND_HEIGHTS: [usize; 7] = [4, 8, 12, 16, 24, 32, 48];

/// [`BAND_HEIGHTS`] up to `most`, and `most` itself (at most `lh`).
fn band_heights(most: usize, lh: usize) -> Vec<usize> {
    let most = most.min(lh);
    BAND_HEIGHTS
        .iter()
        .copied()
        .filter(|&h| h < most)
        .chain([most])
        .collect()
}

/// The stages of one request, measured for the planner.
struct RunStages<'a> {
    /// The budget the plan is for (a banded decode keeps checkpoints in what is left).
    budget: Option<Budget>,
    pipe: &'a Pipeline,
    req: &'a Request,
    lw: usize,
    lh: usize,
    /// Windows the text encoders run at once (branches × windows per prompt).
    prompts: usize,
    /// Text tokens the UNet attends to.
    tokens: usize,
    /// Embedding vectors go into the encoders' inputs.
    vectors: bool,
    /// The request's LoRA branches per text encoder and on the UNet (they count in each
    /// stage's weights and graph).
    text_adapters: Vec<Option<crate::model::Adapters>>,
    unet_adapters: Option<crate::model::Adapters>,
    taesd: Option<Weights<'static>>,
    /// The init image goes through the VAE encoder.
    encode: bool,
}

impl RunStages<'_> {
    /// Whether a tiled decode runs in exact bands ([`vae::TileStats::Image`] with the VAE).
    fn banded(&self) -> bool {
        self.taesd.is_none() && self.req.decoding.vae_tile_stats == vae::TileStats::Image
    }

    /// The VAE decoder's weights as the decode stage holds them.
    fn decoder_weights(&self, w: &Weights<'_>) -> u64 {
        if self.pipe.vae_file.is_some() {
            w.bytes()
        } else {
            self.mapped(network::vae::is_decoder)
        }
    }

    /// The banded decode of least work in bands of one of `heights` latents whose
    /// need fits the budget (without one, the first of `heights` with every checkpoint
    /// kept): its tiling, need and room for checkpoints. Every choice decodes the same
    /// image; they differ in time and memory. When none fits: the least need seen.
    fn bands(
        &self,
        heights: &[usize],
    ) -> Result<std::result::Result<(vae::Tiling, Need, u64), Need>> {
        let p = self.pipe;
        let w = p.vae_weights()?;
        let (cfg, lw, lh) = (&p.vae_config, self.lw, self.lh);
        let weights = self.decoder_weights(&w);
        let other = self.decode_buffers(true);
        let mut options = vae::decode_band_options(&w, cfg, lw, lh, heights)?;
        if self.budget.is_none() {
            // Bands asked for without a budget (`vae_tiling`): memory stays about a
            // tile's, checkpoints included.
            let tile = FORCED_TILE;
            let cap = vae::decode_buffer_bytes(&w, cfg, tile.tile_w, tile.tile_h)? as u64;
            options.retain(|b| b.kept <= cap);
            options.truncate(1);
        }
        let mut known = crate::model::band::Measured::default();
        let fits = |n: &Need| {
            self.budget
                .is_none_or(|b| budget::OVERHEAD + n.total() <= b.bytes)
        };
        let mut least: Option<Need> = None;
        // Unmeasured options over the budget before their compute buffer: only the one
        // of least fixed memory is measured (for the refusal's numbers).
        let lightest = options.iter().map(|b| b.kept).min().unwrap_or(0);
        for b in options {
            let mut need = Need {
                stage: "decode",
                weights,
                compute: 0,
                other: other + b.mid + b.kept,
            };
            if !fits(&need) && b.kept > lightest {
                continue;
            }
            need.compute = vae::decode_band_bytes(&w, cfg, lw, lh, &b, &mut known)? as u64;
            log::debug!(
                "banded decode, bands of {} latents, checkpoints {} MiB: work {:.2}, need {} MiB",
                b.band,
                b.kept >> 20,
                b.work,
                need.total() >> 20
            );
            if fits(&need) {
                let t = vae::Tiling {
                    tile_w: lw,
                    tile_h: b.band,
                    overlap: 0,
                };
                return Ok(Ok((t, need, b.keep)));
            }
            if least.as_ref().is_none_or(|l| need.total() < l.total()) {
                least = Some(need);
            }
        }
        least
            .map(Err)
            .ok_or_else(|| crate::Error::Invalid("no banded decode to plan".into()))
    }

    /// Band heights to plan a banded decode with, up to `most` latents: under a budget
    /// every one of [`BAND_HEIGHTS`]; without one (`vae_tiling`), the one whose bands
    /// cover a forced tile's area.
    fn band_candidates(&self, most: usize) -> Vec<usize> {
        match self.budget {
            Some(_) => band_heights(most, self.lh),
            None => {
                let area = FORCED_TILE.tile_w * FORCED_TILE.tile_h;
                vec![(area / self.lw).clamp(BAND_HEIGHTS[0], most.min(self.lh))]
            }
        }
    }

    /// f32 pixels, blend weights when tiled, 8-bit RGB.
    fn decode_buffers(&self, tiled: bool) -> u64 {
        let f = self.pipe.vae_config.downscale();
        (self.lw * self.lh * f * f * (12 + 4 * tiled as usize + 3)) as u64
    }

    /// Data bytes of the GGUF's tensors that `which` picks.
    fn mapped(&self, which: impl Fn(&str) -> bool) -> u64 {
        self.pipe
            .gguf
            .tensors
            .iter()
            .filter(|t| which(&t.name))
            .map(|t| t.nbytes)
            .sum()
    }
}

impl budget::Stages for RunStages<'_> {
    fn before(&self) -> Result<Vec<Need>> {
        let (p, cfg) = (self.pipe, &self.pipe.config);
        // The encoders run one after the other, each released when done: the largest counts.
        let mut text = Need {
            stage: "text",
            weights: 0,
            compute: 0,
            other: 0,
        };
        for (i, te) in cfg.text_encoders.iter().enumerate() {
            let pooled = cfg.unet.adm_in_channels.is_some() && i + 1 == cfg.text_encoders.len();
            let w = Weights::load(&p.gguf, |n| n.starts_with(&te.prefix))?;
            let run = p.encoder_for(te, self.req)?;
            let adapters = self.text_adapters.get(i).and_then(Option::as_ref);
            text.weights = text
                .weights
                .max(w.bytes() + adapters.map_or(0, |a| a.bytes()));
            text.compute = text.compute.max(clip::buffer_bytes(
                &w,
                &run,
                self.prompts,
                pooled,
                self.vectors,
                adapters,
            )? as u64);
        }
        let mut needs = vec![text];
        if self.encode || cfg.unet.in_channels != p.vae_config.latent_channels {
            let enc = network::vae::is_encoder;
            let w = p.vae_weights()?;
            let f = p.vae_config.downscale();
            let forced = FORCED_TILE.clamp(self.lw, self.lh);
            let compute = if self.req.decoding.vae_tiling && forced.cuts(self.lw, self.lh) {
                vae::encode_tile_bytes(
                    &w,
                    &p.vae_config,
                    self.lw,
                    self.lh,
                    forced,
                    self.req.decoding.vae_tile_stats,
                )?
            } else {
                vae::encode_buffer_bytes(&w, &p.vae_config, self.lw * f, self.lh * f)?
            } as u64;
            let weights = if p.vae_file.is_some() {
                w.bytes()
            } else {
                self.mapped(enc)
            };
            needs.push(Need {
                stage: "encode",
                weights,
                compute,
                other: (3 * 4 * self.lw * self.lh * f * f) as u64,
            });
        }
        Ok(needs)
    }

    fn unet(&self, batch: usize) -> Result<Need> {
        let (p, cfg) = (self.pipe, &self.pipe.config);
        let w = Weights::load(&p.gguf, |n| n.starts_with(UNET_PREFIX))?;
        let adapters = self.unet_adapters.as_ref();
        let shape = unet::Shape {
            width: self.lw,
            height: self.lh,
            batch,
            tokens: self.tokens,
            control: !self.req.controls.is_empty(),
        };
        let mut compute =
            unet::Runner::measure(&w, &cfg.unet, shape, p.attention, adapters)? as u64;
        let mut weights = w.bytes() + adapters.map_or(0, |a| a.bytes());
        // ControlNets: their weights and batch-1 graphs live beside the UNet's, with
        // the residuals of every branch (each ControlNet's, and their sum).
        let mut other = 0;
        for c in &self.req.controls {
            let cw = Weights::load(&c.net.gguf, |n| n.starts_with(CONTROL_PREFIX))?;
            let one = unet::Shape {
                batch: 1,
                control: false,
                ..shape
            };
            compute += controlnet::Runner::measure(&cw, &c.net.config, one, p.attention)? as u64;
            weights += cw.bytes();
            let values: usize = residual_sizes(&c.net.config, self.lw, self.lh)?
                .iter()
                .sum();
            other = other.max(4 * values as u64 * (batch as u64 + 2));
        }
        Ok(Need {
            stage: "unet",
            weights,
            compute,
            other,
        })
    }

    fn unet_streamed_weights(&self) -> Result<u64> {
        let w = Weights::load(&self.pipe.gguf, |n| n.starts_with(UNET_PREFIX))?;
        Ok(w.streamed_bytes() + self.unet_adapters.as_ref().map_or(0, |a| a.bytes()))
    }

    fn decode(&self, tiling: Option<vae::Tiling>) -> Result<Need> {
        let p = self.pipe;
        let other = self.decode_buffers(tiling.is_some());
        if let Some(w) = &self.taesd {
            let t = tiling.unwrap_or(vae::Tiling::square(self.lw.max(self.lh), 0));
            return Ok(Need {
                stage: "decode",
                weights: w.bytes(),
                compute: taesd::decode_tile_bytes(w, t, self.lw, self.lh)? as u64,
                other,
            });
        }
        let w = p.vae_weights()?;
        let compute = match tiling {
            Some(t) if t.clamp(self.lw, self.lh).cuts(self.lw, self.lh) && self.banded() => {
                // What fits in bands at most that high; else the least memory (refused).
                return Ok(match self.bands(&self.band_candidates(t.tile_h))? {
                    Ok((_, need, _)) | Err(need) => need,
                });
            }
            Some(t) => vae::decode_tiled_bytes(&w, &p.vae_config, self.lw, self.lh, t)?,
            None => vae::decode_buffer_bytes(&w, &p.vae_config, self.lw, self.lh)?,
        } as u64;
        Ok(Need {
            stage: "decode",
            weights: self.decoder_weights(&w),
            compute,
            other,
        })
    }

    fn latent(&self) -> (usize, usize) {
        (self.lw, self.lh)
    }

    fn tileable(&self) -> bool {
        true
    }
}
