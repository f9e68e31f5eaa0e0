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
            Some(path) => Some(Weights::from_checkpoint(
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
        let stages = RunStages {
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
        let mut plan = budget::plan(
            &stages,
            self.guided(req),
            Budget::resolve(req.max_memory.or(self.max_memory)),
        )?;
        let forced = FORCED_TILE.clamp(lw, lh);
        if req.decoding.vae_tiling && plan.tiling.is_none() && forced.cuts(lw, lh) {
            let need = budget::Stages::decode(&stages, Some(forced))?;
            if let Some(d) = plan.needs.iter_mut().find(|n| n.stage == "decode") {
                *d = need;
            }
            plan.tiling = Some(forced);
        }
        Ok(plan)
    }
}

/// The stages of one request, measured for the planner.
struct RunStages<'a> {
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
        let f = p.vae_config.downscale();
        // f32 pixels, blend weights when tiled, 8-bit RGB.
        let other = (self.lw * self.lh * f * f * (12 + 4 * tiling.is_some() as usize + 3)) as u64;
        if let Some(w) = &self.taesd {
            let t = tiling.unwrap_or(vae::Tiling::square(self.lw.max(self.lh), 0));
            return Ok(Need {
                stage: "decode",
                weights: w.bytes(),
                compute: taesd::decode_tile_bytes(w, t, self.lw, self.lh)? as u64,
                other,
            });
        }
        let dec = network::vae::is_decoder;
        let w = p.vae_weights()?;
        let compute = match tiling {
            Some(t) => vae::decode_tiled_bytes(
                &w,
                &p.vae_config,
                self.lw,
                self.lh,
                t,
                self.req.decoding.vae_tile_stats,
            )?,
            None => vae::decode_buffer_bytes(&w, &p.vae_config, self.lw, self.lh)?,
        } as u64;
        // Tiles with the image's statistics start from the whole mid block's output, in f32.
        let mid = match tiling {
            Some(t)
                if t.clamp(self.lw, self.lh).cuts(self.lw, self.lh)
                    && self.req.decoding.vae_tile_stats == vae::TileStats::Image =>
            {
                (4 * vae::mid_channels(&p.vae_config) * self.lw * self.lh) as u64
            }
            _ => 0,
        };
        let weights = if p.vae_file.is_some() {
            w.bytes()
        } else {
            self.mapped(dec)
        };
        Ok(Need {
            stage: "decode",
            weights,
            compute,
            other: other + mid,
        })
    }

    fn latent(&self) -> (usize, usize) {
        (self.lw, self.lh)
    }

    fn tileable(&self) -> bool {
        true
    }
}
