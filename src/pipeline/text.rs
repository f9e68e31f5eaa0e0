//! A request's text conditioning: prompts → weighted 77-token windows → every text
//! encoder's hidden states, concatenated along the tokens (long prompts) and side by
//! side along the width (SDXL's two encoders).
use crate::config::TextEncoderConfig;
use crate::error::{Error, Result};
use crate::model::clip;
use crate::prompt::{take_loras, Chunk, Trigger, Windows};

use super::{Conditioning, Pipeline, Request};

/// At most this many 75-token windows per prompt (2400 tokens): the text encoders run
/// them as one batch and the UNet attends to all of them, so an unbounded prompt would
/// be an unbounded allocation.
pub const MAX_WINDOWS: usize = 32;

/// Every prompt of a run in windows, per text encoder.
pub(super) struct Prompts {
    /// `[encoder][prompt][window]`; the all-zero branch has none.
    windows: Vec<Vec<Vec<Chunk>>>,
    /// Per encoder, the window shorter prompts are padded with.
    empty: Vec<Chunk>,
    /// Windows per prompt after padding: the UNet attends to `count × 77` tokens.
    pub count: usize,
    /// Whether an embedding's vectors go in anywhere (the encoders' graphs then take them).
    pub vectors: bool,
}

impl Prompts {
    /// The embeddings (indices into the pipeline's list) placed in any window.
    pub fn used_embeddings(&self) -> std::collections::BTreeSet<usize> {
        self.windows
            .iter()
            .flatten()
            .flatten()
            .flat_map(|c| c.fixes.iter().map(|f| f.embedding))
            .collect()
    }
}

impl Pipeline {
    /// The prompts of a request's branches: `[negative, prompt]` when guided, with
    /// whether a branch is the all-zero unconditional one.
    /// `<lora:…>` tags are not text: they are taken out (the prompt's pick its LoRAs,
    /// [`Pipeline::request_loras`]; the negative prompt's are dropped with a warning).
    pub(super) fn branches(&self, req: &Request) -> Result<Vec<(String, bool)>> {
        let mut prompts = vec![(take_loras(&req.prompt)?.0, false)];
        if self.guided(req) {
            let (negative, tags) = take_loras(&req.negative)?;
            if !tags.is_empty() {
                log::warn!(
                    "LoRA tags in the negative prompt are ignored: {}",
                    tags.iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let zero = req.negative.is_empty() && self.config.zeros_for_empty_negative;
            prompts.insert(0, (negative, zero));
        }
        Ok(prompts)
    }

    /// The encoder as the request runs it: CLIP skip `n` stops `n - 1` layers before
    /// the model's own output layer (A1111's numbering; diffusers' `clip_skip` is
    /// `n - 1`), keeping the model's final-norm choice.
    pub(super) fn encoder_for(
        &self,
        te: &TextEncoderConfig,
        req: &Request,
    ) -> Result<TextEncoderConfig> {
        let skip = req
            .prompting
            .clip_skip
            .checked_sub(1)
            .map(|extra| te.skip_layers + extra)
            .filter(|&s| s < te.num_layers);
        let skip = skip.ok_or_else(|| {
            Error::Invalid(format!(
                "CLIP skip {} is out of range for a {}-layer text encoder (1 to {})",
                req.prompting.clip_skip,
                te.num_layers,
                te.num_layers - te.skip_layers
            ))
        })?;
        Ok(TextEncoderConfig {
            skip_layers: skip,
            ..te.clone()
        })
    }

    /// Text tokens the UNet attends to for these prompts.
    pub(super) fn context_tokens(&self, p: &Prompts) -> usize {
        p.count
            * self
                .config
                .text_encoders
                .first()
                .map_or(77, |t| t.max_positions)
    }

    /// Adds textual-inversion embeddings: a file, or every embedding file of a folder
    /// (where files for other models are skipped with a warning).
    pub fn add_embeddings(&mut self, path: &std::path::Path) -> Result<usize> {
        let encoders = &self.config.text_encoders;
        if path.is_dir() {
            self.embeddings.add_dir(path, encoders)
        } else {
            self.embeddings.add(path, encoders)
        }
    }

    /// Cuts the branches' prompts into windows for every encoder.
    pub(super) fn prompts(&self, req: &Request) -> Result<Prompts> {
        let branches = self.branches(req)?;
        let mut windows = Vec::new();
        let mut empty = Vec::new();
        let mut vectors = false;
        for te in &self.config.text_encoders {
            let triggers: Vec<Trigger> = self
                .embeddings
                .list
                .iter()
                .enumerate()
                .flat_map(|(e, emb)| emb.names.iter().map(move |n| (e, emb, n)))
                .map(|(e, emb, n)| {
                    Ok(Trigger {
                        ids: self.tokenizer.encode(n)?,
                        vectors: emb.vectors,
                        embedding: e,
                    })
                })
                .collect::<Result<_>>()?;
            let cut = Windows::new(&self.tokenizer, te.max_positions, te.pad_token, &triggers)?;
            let mut per_prompt = Vec::new();
            for (text, zero) in &branches {
                per_prompt.push(if *zero {
                    Vec::new()
                } else {
                    cut.chunks(&req.prompting.emphasis.pieces(text)?)?
                });
            }
            vectors |= per_prompt.iter().flatten().any(|c| !c.fixes.is_empty());
            if let Some(long) = per_prompt.iter().find(|w| w.len() > MAX_WINDOWS) {
                return Err(Error::Invalid(format!("a prompt of {} 75-token windows is too long: at most {MAX_WINDOWS} ({} tokens)", long.len(), MAX_WINDOWS * 75)));
            }
            windows.push(per_prompt);
            empty.push(cut.empty());
        }
        let count = windows
            .iter()
            .flatten()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Prompts {
            windows,
            empty,
            count,
            vectors,
        })
    }

    /// The text conditioning of `req` on its own (what [`Pipeline::generate`] feeds the UNet).
    pub fn text_conditioning(&self, req: &Request) -> Result<Conditioning> {
        for te in &self.config.text_encoders {
            self.encoder_for(te, req)?;
        }
        self.encode_prompts(req, &self.prompts(req)?, &self.request_loras(req)?)
    }

    /// The UNet's text conditioning of the branches ([`Pipeline::branches`]): every
    /// encoder's weighted hidden states, windows one after the other, encoders side by
    /// side per token (SDXL: CLIP-L's 768 then bigG's 1280); for `label_emb` UNets the
    /// last encoder's pooled embedding of each prompt's first window. Each encoder's
    /// weights leave resident memory when it is done (they are mapped: a later run
    /// faults them back in), so stages do not add up in the peak.
    pub(super) fn encode_prompts(
        &self,
        req: &Request,
        p: &Prompts,
        loras: &[super::lora::RequestLora],
    ) -> Result<Conditioning> {
        let cfg = &self.config;
        let branches = self.branches(req)?;
        let n = branches.len();
        let k = p.count;
        let width = cfg.unet.context_dim;
        let live: Vec<usize> = (0..n).filter(|&b| !branches[b].1).collect();
        let mut context: Vec<f32> = Vec::new();
        let mut pooled = None;
        let mut offset = 0;
        for (i, te) in cfg.text_encoders.iter().enumerate() {
            let len = te.max_positions;
            let t = k * len;
            if context.is_empty() {
                context = vec![0f32; n * t * width];
            }
            let want_pooled =
                cfg.unet.adm_in_channels.is_some() && i + 1 == cfg.text_encoders.len();
            let run = self.encoder_for(te, req)?;
            let h = te.hidden_size;
            let window = |b: usize, w: usize| p.windows[i][b].get(w).unwrap_or(&p.empty[i]);
            let mut tokens = Vec::with_capacity(live.len() * k);
            let mut vectors = Vec::new();
            for &b in &live {
                for w in 0..k {
                    let c = window(b, w);
                    let base = tokens.len() * len;
                    for fix in &c.fixes {
                        let emb = &self.embeddings.list[fix.embedding];
                        let data = emb.data.get(i).ok_or_else(|| {
                            Error::Invalid(format!(
                                "embedding `{}` has no vectors for text encoder {i}",
                                emb.names.join("/")
                            ))
                        })?;
                        for (v, values) in data.chunks(h).enumerate() {
                            vectors.push(clip::Vector {
                                row: base + fix.offset + v,
                                values,
                            });
                        }
                    }
                    tokens.push(c.ids.clone());
                }
            }
            let mut out = {
                let adapters = self.adapters(loras, super::lora::Part::Text, |n| {
                    n.starts_with(&te.prefix)
                })?;
                let w = self.stage(|n| n.starts_with(&te.prefix), |_| false, |d| &d.text)?;
                clip::encode_with(
                    &w,
                    &run,
                    &tokens,
                    &vectors,
                    want_pooled,
                    adapters.as_ref(),
                    &self.backend,
                )?
            };
            self.gguf.release(|n| n.starts_with(&te.prefix));
            for (j, &b) in live.iter().enumerate() {
                for w in 0..k {
                    let z = &mut out.hidden[(j * k + w) * len * h..][..len * h];
                    req.prompting.emphasis.apply(z, &window(b, w).weights)?;
                    for (pos, row) in z.chunks(h).enumerate() {
                        context[(b * t + w * len + pos) * width + offset..][..h]
                            .copy_from_slice(row);
                    }
                }
            }
            offset += h;
            if let Some(pool) = out.pooled {
                let d = pool.len() / tokens.len().max(1);
                let mut all = vec![0f32; n * d];
                for (j, &b) in live.iter().enumerate() {
                    all[b * d..][..d].copy_from_slice(&pool[j * k * d..][..d]);
                }
                pooled = Some(all);
            }
        }
        Ok(Conditioning {
            context,
            pooled,
            tokens: k * cfg.text_encoders.first().map_or(77, |t| t.max_positions),
        })
    }
}
