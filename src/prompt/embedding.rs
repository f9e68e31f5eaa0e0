//! Textual-inversion embeddings: learned token vectors that a trigger word in the
//! prompt stands for (Gal et al. 2022, "An Image is Worth One Word").
//!
//! The files people share, in `.pt`/`.bin` (torch zip) or `.safetensors`:
//! - A1111: `string_to_param.*` (`[n, width]`), or `emb_params` in safetensors;
//! - SDXL: `clip_l` (`[n, 768]`) and `clip_g` (`[n, 1280]`), one set per encoder;
//! - diffusers: `{token: [width] or [n, width]}`, the token named by the file.
//!
//! The trigger word is the file's stem (A1111's rule); a diffusers file's own token
//! triggers it too. Vectors are matched to encoders by their key (`clip_l`: the CLIP-L
//! encoder, `clip_g`: OpenCLIP bigG) or, unkeyed, by width; an embedding must have
//! vectors for every text encoder of the model, the same number for each.
use std::path::{Path, PathBuf};

use crate::config::{TextEncoderConfig, TextEncoderKind};
use crate::error::{Error, Result};
use crate::formats::Checkpoint;

/// At most this many vectors per embedding (a window holds 75 tokens).
const MAX_VECTORS: usize = 75;

/// One embedding: per text encoder of the model, `vectors × width` floats.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// Trigger words.
    pub names: Vec<String>,
    pub path: PathBuf,
    pub vectors: usize,
    /// Per text encoder, in the model's order: `vectors × hidden` floats.
    pub data: Vec<Vec<f32>>,
}

/// One tensor set as the file holds it, before it is matched to encoders.
struct Set {
    key: Option<&'static str>,
    rows: usize,
    width: usize,
    data: Vec<f32>,
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Embedding {
    /// Reads `path` for a model with text encoders `encoders`. A diffusers file with
    /// several tokens gives one embedding per token.
    pub fn open(path: &Path, encoders: &[TextEncoderConfig]) -> Result<Vec<Embedding>> {
        let ck = Checkpoint::open(path)?;
        let bad = |msg: String| Error::format(path, msg);
        let set = |t: &crate::formats::SourceTensor, key: Option<&'static str>| -> Result<Set> {
            let (rows, width) = match t.shape.as_slice() {
                [w] => (1, (*w)),
                [n, w] => ((*n), (*w)),
                s => {
                    return Err(bad(format!(
                    "tensor `{}` has shape {s:?}; embedding vectors are [width] or [count, width]",
                    t.name
                )))
                }
            };
            if rows == 0 || width == 0 || rows > MAX_VECTORS {
                return Err(bad(format!("tensor `{}` holds {rows} vectors of width {width}: expected 1 to {MAX_VECTORS} vectors", t.name)));
            }
            if !t.dtype.is_float() {
                return Err(bad(format!(
                    "tensor `{}` is {}, not floating point",
                    t.name,
                    t.dtype.name()
                )));
            }
            Ok(Set {
                key,
                rows,
                width,
                data: t.read_f32()?,
            })
        };
        let named = |n: &str| {
            ck.tensors
                .iter()
                .filter(|t| t.name == n || t.name.starts_with(&format!("{n}.")))
                .collect::<Vec<_>>()
        };
        let one = |n: &str| -> Result<Option<&crate::formats::SourceTensor>> {
            match named(n).as_slice() {
                [] => Ok(None),
                [t] => Ok(Some(*t)),
                many => Err(bad(format!(
                    "{} tensors under `{n}`; an embedding file holds one",
                    many.len()
                ))),
            }
        };
        let mut out = Vec::new();
        if let (Some(l), Some(g)) = (one("clip_l")?, one("clip_g")?) {
            out.push((
                vec![stem(path)],
                vec![set(l, Some("clip_l"))?, set(g, Some("clip_g"))?],
            ));
        } else if let Some(t) = one("string_to_param")?.or(one("emb_params")?) {
            out.push((vec![stem(path)], vec![set(t, None)?]));
        } else {
            // diffusers: every tensor is a token's vectors.
            let single = ck.tensors.len() == 1;
            for t in &ck.tensors {
                let mut names = vec![t.name.clone()];
                if single && stem(path) != t.name {
                    names.push(stem(path));
                }
                out.push((names, vec![set(t, None)?]));
            }
        }
        if out.is_empty() {
            return Err(bad("no embedding vectors in the file (expected string_to_param, emb_params, clip_l/clip_g or token tensors)".into()));
        }
        out.into_iter()
            .map(|(names, sets)| Self::fit(path, names, sets, encoders))
            .collect()
    }

    /// Matches the file's sets to the model's encoders.
    fn fit(
        path: &Path,
        names: Vec<String>,
        sets: Vec<Set>,
        encoders: &[TextEncoderConfig],
    ) -> Result<Embedding> {
        let widths = || {
            sets.iter()
                .map(|s| s.width.to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        };
        let mut data = Vec::new();
        let mut vectors = None;
        let mut used = vec![false; sets.len()];
        for te in encoders {
            let found = sets.iter().enumerate().find(|(_, s)| match s.key {
                Some("clip_l") => te.kind == TextEncoderKind::HfClip && s.width == te.hidden_size,
                Some(_) => te.kind == TextEncoderKind::OpenClip && s.width == te.hidden_size,
                None => s.width == te.hidden_size,
            });
            let Some((k, s)) = found else {
                return Err(Error::format(
                    path,
                    format!("embedding `{}` has {}-wide vectors, but the model's `{}` text encoder is {} wide: an embedding for another model?", names[0], widths(), te.prefix, te.hidden_size),
                ));
            };
            if *vectors.get_or_insert(s.rows) != s.rows {
                return Err(Error::format(
                    path,
                    format!(
                        "embedding `{}` has a different number of vectors per text encoder",
                        names[0]
                    ),
                ));
            }
            used[k] = true;
            data.push(s.data.clone());
        }
        // SDXL's clip_l vectors were learned with clip_g beside them: on a model without
        // that second encoder the embedding is for another model.
        if let Some(s) = sets.iter().zip(&used).find(|(_, u)| !**u).map(|(s, _)| s) {
            return Err(Error::format(path, format!("embedding `{}` has {} vectors ({} wide) for a text encoder this model lacks: an embedding for another model?", names[0], s.key.unwrap_or("unkeyed"), s.width)));
        }
        let vectors =
            vectors.ok_or_else(|| Error::format(path, "the model has no text encoder"))?;
        Ok(Embedding {
            names,
            path: path.to_path_buf(),
            vectors,
            data,
        })
    }
}

/// The embeddings a pipeline knows, by trigger word.
#[derive(Clone, Debug, Default)]
pub struct Embeddings {
    pub list: Vec<Embedding>,
}

/// File extensions an embedding folder is searched for.
const EXTENSIONS: &[&str] = &["pt", "bin", "safetensors"];

impl Embeddings {
    /// Adds the embeddings of `path`; an unreadable file or one for another model is an error.
    /// Returns how many embeddings the file held.
    pub fn add(&mut self, path: &Path, encoders: &[TextEncoderConfig]) -> Result<usize> {
        let list = Embedding::open(path, encoders)?;
        let n = list.len();
        list.into_iter().for_each(|e| self.insert(e));
        Ok(n)
    }

    /// Adds every `.pt`/`.bin`/`.safetensors` file of `dir` (not recursive). Files for
    /// other models or in other formats are skipped with a warning, as a folder of
    /// downloads usually holds some; returns how many embeddings were added.
    pub fn add_dir(&mut self, dir: &Path, encoders: &[TextEncoderConfig]) -> Result<usize> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        let mut added = 0;
        for f in files {
            match Embedding::open(&f, encoders) {
                Ok(list) => {
                    added += list.len();
                    list.into_iter().for_each(|e| self.insert(e));
                }
                Err(e) => log::warn!("skipping embedding: {e}"),
            }
        }
        Ok(added)
    }

    /// A later embedding with the same trigger replaces the earlier one.
    fn insert(&mut self, e: Embedding) {
        for old in &mut self.list {
            old.names.retain(|n| !e.names.contains(n));
        }
        self.list.retain(|o| !o.names.is_empty());
        self.list.push(e);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
