//! Super-resolution with an ESRGAN-family network ([`esrgan`]): a picture in, a picture
//! `scale` times larger out, run in overlapping tiles so the compute buffer is one
//! tile's whatever the picture's size.
//!
//! ```no_run
//! use sdrs::pipeline::upscale::Upscaler;
//! let up = Upscaler::load("RealESRGAN_x4plus.pth".as_ref(), 2)?;
//! let small = sdrs::pipeline::Image::open("small.png".as_ref())?;
//! up.upscale(&small, 1, &mut |_, _| Ok(()))?.save_png("large.png".as_ref())?;
//! # Ok::<(), sdrs::Error>(())
//! ```
use std::path::{Path, PathBuf};

use super::{to_rgb8, Image};
use crate::budget::{self, Budget, Need};
use crate::error::{Error, Result};
use crate::formats::gguf::{metadata, GgufFile};
use crate::formats::Checkpoint;
use crate::ggml::Backend;
use crate::model::esrgan::{self, Arch};
use crate::model::tile::Tick;
use crate::model::Weights;

/// Input pixels per tile side by default: a 4x RRDBNet's buffer for it stays near
/// 1 GiB; smaller tiles for less.
pub const TILE: usize = 192;

/// An upscaler's weights, where they compute, and what network they make.
pub struct Upscaler {
    weights: Weights<'static>,
    pub arch: Arch,
    backend: Backend,
    path: PathBuf,
    /// Input pixels per tile side.
    pub tile: usize,
}

impl Upscaler {
    /// Reads an ESRGAN-family upscaler: our GGUF (`sdrs convert`; its weights as
    /// stored, quantized or not), or a checkpoint (`.pth` through the restricted
    /// unpickler, or `.safetensors`) into f32 weights, its network recognised.
    pub fn load(path: &Path, threads: usize) -> Result<Self> {
        let backend = Backend::cpu(threads)?;
        let (weights, arch) = if crate::formats::gguf::is_gguf(path)? {
            let g = GgufFile::open(path)?;
            let arch = metadata::read_upscaler(&g)?.ok_or_else(|| {
                Error::arch(
                    path,
                    "not an upscaler (no `sd-upscaler` metadata): give a model to `-m` of `generate`",
                )
            })?;
            (Weights::upload(&g, |_| true, &backend)?, arch)
        } else {
            let mut ck = Checkpoint::open(path)?;
            esrgan::normalize_checkpoint(&mut ck);
            let weights = Weights::from_checkpoint(&ck, &backend)?;
            let arch = esrgan::detect(&weights)?;
            (weights, arch)
        };
        let up = Upscaler {
            weights,
            arch,
            backend,
            path: path.to_path_buf(),
            tile: TILE,
        };
        // The graph of one small tile checks every weight against the network.
        up.tile_bytes((64, 64))
            .map_err(|e| Error::format(path, format!("weights do not make its network: {e}")))?;
        Ok(up)
    }

    /// The upscaler's file name without its extension, as infotexts name it.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn scale(&self) -> usize {
        self.arch.scale()
    }

    /// The compute buffer of one tile of a `w`x`h` picture.
    pub fn tile_bytes(&self, size: (usize, usize)) -> Result<usize> {
        esrgan::tile_bytes(&self.weights, &self.arch, self.tile, size)
    }

    /// The weights' bytes (f32, in memory).
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// What upscaling a `w`x`h` picture once needs at the current tile: the weights,
    /// one tile's compute buffer, and the picture's f32 planes in and out.
    pub fn need(&self, (w, h): (usize, usize)) -> Result<Need> {
        let s = self.scale() as u64;
        let planes = 4 * 3 * (w * h) as u64 * (1 + 2 * s * s);
        Ok(Need {
            stage: "upscale",
            weights: self.weight_bytes(),
            compute: self.tile_bytes((w, h))? as u64,
            other: planes,
        })
    }

    /// Shrinks the tile until upscaling a `w`x`h` picture fits `budget` (else this
    /// process's memory cgroup limit; nothing to fit without either); refused when even
    /// the smallest tile does not fit.
    pub fn fit(&mut self, size: (usize, usize), budget: Option<u64>) -> Result<()> {
        let Some(b) = Budget::resolve(budget) else {
            return Ok(());
        };
        let start = self.tile;
        for tile in [start, 512, 384, 256, 192, 128, 96, 64, 48, 32]
            .into_iter()
            .filter(|&t| t <= start)
        {
            self.tile = tile;
            if budget::OVERHEAD + self.need(size)?.total() <= b.bytes {
                return Ok(());
            }
        }
        let (n, smallest) = (self.need(size)?, self.tile);
        self.tile = start;
        Err(Error::OverBudget(format!(
            "upscaling {}x{} cannot fit a budget of {}: at the smallest tile ({smallest} pixels) it needs {} (weights {} + compute {} + pictures {}) and the process {} more",
            size.0,
            size.1,
            budget::mib(b.bytes),
            budget::mib(n.total()),
            budget::mib(n.weights),
            budget::mib(n.compute),
            budget::mib(n.other),
            budget::mib(budget::OVERHEAD)
        )))
    }

    /// RGB planes `[3][h][w]` in [0, 1] through the network once: `[3][h·s][w·s]`,
    /// unclamped.
    pub fn upscale_planes(
        &self,
        rgb: &[f32],
        size: (usize, usize),
        tick: Tick<'_>,
    ) -> Result<Vec<f32>> {
        esrgan::upscale(
            &self.weights,
            &self.arch,
            rgb,
            size,
            self.tile,
            &self.backend,
            tick,
        )
    }

    /// `image` upscaled `repeats` times; its parameters gain the upscaler's name and
    /// the factor. `tick(done, total)` after each tile of each pass.
    pub fn upscale(&self, image: &Image, repeats: usize, tick: Tick<'_>) -> Result<Image> {
        if repeats == 0 {
            return Err(Error::Invalid("an upscale needs at least one pass".into()));
        }
        let (mut w, mut h) = (image.width, image.height);
        let n = w * h;
        let mut rgb: Vec<f32> = (0..3 * n)
            .map(|i| image.rgb[(i % n) * 3 + i / n] as f32 / 255.0)
            .collect();
        let s = self.scale();
        for _ in 0..repeats {
            let side = |v: usize| {
                v.checked_mul(s)
                    .filter(|&v| v <= super::canvas::MAX_SIDE as usize)
            };
            let (Some(nw), Some(nh)) = (side(w), side(h)) else {
                return Err(Error::Invalid(format!(
                    "{w}x{h} upscaled {s}x would pass the {} pixel side limit",
                    super::canvas::MAX_SIDE
                )));
            };
            rgb = self.upscale_planes(&rgb, (w, h), &mut *tick)?;
            (w, h) = (nw, nh);
        }
        let name = self.name();
        let factor = s.pow(repeats as u32);
        // A1111's names for an upscale after generation (its "Extras").
        let upscaled = format!("Postprocess upscaler: {name}, Postprocess upscale by: {factor}");
        let parameters = if image.parameters.is_empty() {
            upscaled
        } else {
            format!("{}, {upscaled}", image.parameters)
        };
        Ok(Image {
            width: w,
            height: h,
            rgb: to_rgb8(&rgb, w * h, true),
            parameters,
            timings: image.timings,
        })
    }
}
