//! Memory budgets: what each stage of a generation keeps resident, and the choices
//! that fit a run into a budget (classifier-free guidance as two batches of one, the
//! VAE decode in tiles), all made before any work so that a run that cannot fit is
//! refused at once instead of being killed halfway.
//!
//! A stage needs its weights resident (memory-mapped pages, or copies in anonymous
//! memory) plus its compute buffer; stages run one after another and each lets its
//! weights go when done (see `GgufFile::release`), so the peak is the largest stage
//! plus what the process always holds. Page-cache pages of stages already run stay
//! charged to a memory cgroup, but they are clean and the kernel reclaims them before
//! it kills anything.
use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::model::vae::Tiling;

/// What the process holds besides the stages: code and ggml's libraries, the
/// tokenizer, heaps, latents and the conditioning (measured at 30–40 MB; rounded up).
pub const OVERHEAD: u64 = 64 << 20;

/// Tiles overlap by this many latents (64 pixels for SD's VAE) and are never smaller
/// than twice that.
pub const TILE_OVERLAP: usize = 8;
pub const MIN_TILE: usize = 2 * TILE_OVERLAP;

/// One stage's resident memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub stage: &'static str,
    /// Weight bytes the stage reads (mapped or copied).
    pub weights: u64,
    /// The graph's compute buffer.
    pub compute: u64,
    /// Inputs and outputs kept on the Rust side (decoded pixels, blend weights).
    pub other: u64,
}

impl Need {
    pub fn total(&self) -> u64 {
        self.weights + self.compute + self.other
    }
}

/// Where a budget came from (said in messages, so a refusal can be understood).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--max-memory` (or the library's `Pipeline::max_memory`).
    Given,
    /// The memory cgroup this process runs in.
    Cgroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub source: Source,
}

impl Budget {
    /// The budget to plan with: the one given, else this process's memory cgroup
    /// limit where it has one (a container, `systemd-run -p MemoryMax=`), else none.
    pub fn resolve(given: Option<u64>) -> Option<Budget> {
        match given {
            Some(bytes) => Some(Budget {
                bytes,
                source: Source::Given,
            }),
            None => cgroup_limit().map(|bytes| Budget {
                bytes,
                source: Source::Cgroup,
            }),
        }
    }

    fn describe(&self) -> String {
        match self.source {
            Source::Given => format!("the memory budget of {}", mib(self.bytes)),
            Source::Cgroup => format!(
                "this process's memory cgroup limit of {} (give --max-memory to plan for another)",
                mib(self.bytes)
            ),
        }
    }
}

/// The run as planned: each stage's need and the choices that made it fit.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub budget: Option<Budget>,
    pub needs: Vec<Need>,
    /// The guided UNet runs its two branches as two batches of one (half the
    /// compute buffer, the same result).
    pub split_guidance: bool,
    /// The VAE decodes in tiles.
    pub tiling: Option<Tiling>,
    /// The UNet reads its weights from the model file's mapping instead of copies in
    /// ggml's faster repacked layout, so they are clean file pages that the kernel may
    /// drop under the budget and read again at the next step (slower, but a run that
    /// could not fit otherwise completes). Matrices the file stores interleaved are
    /// read so either way ([`crate::ggml::repack`]), with the repacked kernel.
    pub stream_unet: bool,
    /// A banded decode's room for checkpoints, in bytes (`None`: no limit; see
    /// [`crate::model::band`]).
    pub decode_keep: Option<u64>,
}

impl Plan {
    /// Estimated peak resident memory.
    pub fn peak(&self) -> u64 {
        OVERHEAD + self.needs.iter().map(Need::total).max().unwrap_or(0)
    }

    /// One line per stage and the choices, for `bench`, `generate -v` and refusals.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for n in &self.needs {
            let _ = writeln!(
                s,
                "  {:<7} {:>9} = weights {} + compute {} + buffers {}",
                n.stage,
                mib(n.total()),
                mib(n.weights),
                mib(n.compute),
                mib(n.other)
            );
        }
        let _ = write!(
            s,
            "  peak    {:>9} (with {} for the process itself)",
            mib(self.peak()),
            mib(OVERHEAD)
        );
        if self.split_guidance {
            s.push_str("; guidance as two batches of one");
        }
        if self.stream_unet {
            s.push_str("; UNet weights read from the file as needed");
        }
        match (self.tiling, self.decode_keep) {
            (Some(t), Some(_)) => {
                let _ = write!(
                    s,
                    "; VAE decode in {}-latent bands (the whole decode's, to rounding)",
                    t.tile_h
                );
            }
            (Some(t), None) => {
                let _ = write!(s, "; VAE decode in {}x{}-latent tiles", t.tile_w, t.tile_h);
            }
            _ => {}
        }
        if let Some(b) = self.budget {
            let _ = write!(s, "; budget {}", mib(b.bytes));
        }
        s
    }
}

/// What the planner can measure: each stage's need under each choice.
pub trait Stages {
    /// Stages before the UNet (text encoding, an encode for inpainting models).
    fn before(&self) -> Result<Vec<Need>>;
    /// The UNet with `batch` latents per evaluation.
    fn unet(&self, batch: usize) -> Result<Need>;
    /// The UNet's weight bytes that must stay resident when they are left in the
    /// file's mapping ([`Plan::stream_unet`]); its compute buffer is the same.
    fn unet_streamed_weights(&self) -> Result<u64>;
    /// The decode of the whole latent (`None`) or in tiles.
    fn decode(&self, tiling: Option<Tiling>) -> Result<Need>;
    /// Latent width and height (for tiling).
    fn latent(&self) -> (usize, usize);
    /// Whether the decoder can be tiled (the VAE can; TAESD runs whole).
    fn tileable(&self) -> bool;
}

/// Plans a run: with a budget, the fastest choices that fit it (guidance batched
/// unless splitting is needed, the decode whole unless tiles are needed, the
/// fewest-overlap tiling that fits), or an [`Error::OverBudget`] naming the stage
/// that cannot fit and what it needs. `guided`: the UNet runs both CFG branches.
pub fn plan(stages: &dyn Stages, guided: bool, budget: Option<Budget>) -> Result<Plan> {
    let mut needs = stages.before()?;
    let room = |n: &Need| budget.is_none_or(|b| OVERHEAD + n.total() <= b.bytes);
    let refuse = |n: &Need, what: &str| -> Error {
        let b = budget.map(|b| b.describe()).unwrap_or_default();
        Error::OverBudget(format!(
            "this run cannot fit {b}: the {} stage needs {} {what}(weights {} + compute {} + buffers {}) and the process {} more; \
             try a smaller image or weight type, or a larger budget",
            n.stage,
            mib(n.total()),
            mib(n.weights),
            mib(n.compute),
            mib(n.other),
            mib(OVERHEAD)
        ))
    };
    if let Some(n) = needs.iter().find(|n| !room(n)) {
        return Err(refuse(n, ""));
    }
    let mut split_guidance = false;
    let batched = stages.unet(if guided { 2 } else { 1 })?;
    let mut unet = batched.clone();
    if guided && !room(&unet) {
        split_guidance = true;
        unet = stages.unet(1)?;
    }
    // Last, the weights left to the page cache: each step may read them again.
    let mut stream_unet = false;
    if !room(&unet) {
        // Streamed, both branches in one batch read the weights once per step: worth
        // more than the halved buffer, so that is tried first again.
        let weights = stages.unet_streamed_weights()?;
        let split = split_guidance;
        split_guidance = false;
        let mut streamed = Need { weights, ..batched };
        if split && !room(&streamed) {
            split_guidance = true;
            streamed = Need { weights, ..unet };
        }
        if !room(&streamed) {
            return Err(refuse(
                &streamed,
                "even with one latent per evaluation and its weights read from the file as needed ",
            ));
        }
        stream_unet = true;
        unet = streamed;
    }
    needs.push(unet);
    let whole = stages.decode(None)?;
    let (decode, tiling) = if room(&whole) {
        (whole, None)
    } else if !stages.tileable() {
        return Err(refuse(&whole, ""));
    } else {
        let (w, h) = stages.latent();
        let smallest = Tiling {
            tile_w: MIN_TILE,
            tile_h: MIN_TILE,
            overlap: TILE_OVERLAP,
        };
        let small = stages.decode(Some(smallest))?;
        if !room(&small) {
            return Err(refuse(
                &small,
                "even decoded piece by piece (in its smallest tiles or bands) ",
            ));
        }
        match fit_tiles(stages, w, h, &whole, &small, &room)? {
            Some(found) => found,
            None => (small, Some(smallest)),
        }
    };
    needs.push(decode);
    Ok(Plan {
        budget,
        needs,
        split_guidance,
        tiling,
        stream_unet,
        decode_keep: None,
    })
}

/// The cheapest tiling (least decoded overlap) that fits. Compute buffers grow about
/// linearly with the tile's area, so candidates are ranked by cost and screened with
/// a line through the two measured ends; only the screened ones are measured.
fn fit_tiles(
    stages: &dyn Stages,
    w: usize,
    h: usize,
    whole: &Need,
    small: &Need,
    room: &dyn Fn(&Need) -> bool,
) -> Result<Option<(Need, Option<Tiling>)>> {
    let sides = |len: usize| -> Vec<usize> {
        (MIN_TILE..len)
            .step_by(8)
            .chain(std::iter::once(len))
            .collect()
    };
    let mut candidates: Vec<Tiling> = sides(w)
        .into_iter()
        .flat_map(|tw| {
            sides(h).into_iter().map(move |th| Tiling {
                tile_w: tw,
                tile_h: th,
                overlap: TILE_OVERLAP,
            })
        })
        .filter(|t| t.tile_w < w || t.tile_h < h)
        .collect();
    // Cheapest first; among equals the larger tile (fewer seams).
    candidates.sort_by(|a, b| {
        a.cost(w, h)
            .total_cmp(&b.cost(w, h))
            .then((b.tile_w * b.tile_h).cmp(&(a.tile_w * a.tile_h)))
    });
    let (a0, a1) = ((MIN_TILE * MIN_TILE) as f64, (w * h) as f64);
    let per_area = (whole.compute as f64 - small.compute as f64) / (a1 - a0).max(1.0);
    for t in candidates {
        let area = (t.tile_w * t.tile_h) as f64;
        let guess = Need {
            compute: (small.compute as f64 + per_area * (area - a0)).max(0.0) as u64,
            ..small.clone()
        };
        if !room(&guess) {
            continue;
        }
        let need = stages.decode(Some(t))?;
        if room(&need) {
            return Ok(Some((need, Some(t))));
        }
    }
    Ok(None)
}

/// A size as people write it: bytes, or with K/M/G (binary: KiB, MiB, GiB; also
/// written `KiB`…) or KB/MB/GB (decimal). `768M`, `1.5G`, `2GB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    let bytes = value * scale;
    (bytes.is_finite() && (1.0..1e18).contains(&bytes)).then_some(bytes as u64)
}

/// This process's memory cgroup limit (cgroup v2 `memory.max`, v1
/// `memory.limit_in_bytes`), if it has a finite one.
pub fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        // "max" (v2) or a huge page-rounded number (v1) mean no limit.
        if let Ok(v) = text.trim().parse::<u64>() {
            if v < (1u64 << 50) {
                return Some(v);
            }
        }
    }
    None
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages whose needs follow simple formulas (MiB): text 100, UNet 300 + 100 per
    /// latent of the batch, decode 50 + compute proportional to the tile's area.
    struct Fake {
        latent: (usize, usize),
        tileable: bool,
    }

    const M: u64 = 1 << 20;

    impl Stages for Fake {
        fn before(&self) -> Result<Vec<Need>> {
            Ok(vec![Need {
                stage: "text",
                weights: 80 * M,
                compute: 20 * M,
                other: 0,
            }])
        }
        fn unet(&self, batch: usize) -> Result<Need> {
            Ok(Need {
                stage: "unet",
                weights: 300 * M,
                compute: 100 * M * batch as u64,
                other: 0,
            })
        }
        fn unet_streamed_weights(&self) -> Result<u64> {
            Ok(10 * M)
        }
        fn decode(&self, tiling: Option<Tiling>) -> Result<Need> {
            let (w, h) = self.latent;
            let area = tiling.map_or(w * h, |t| t.clamp(w, h).tile_w * t.clamp(w, h).tile_h) as u64;
            Ok(Need {
                stage: "decode",
                weights: 50 * M,
                compute: area * M / 4,
                other: M,
            })
        }
        fn latent(&self) -> (usize, usize) {
            self.latent
        }
        fn tileable(&self) -> bool {
            self.tileable
        }
    }

    fn budget(mib: u64) -> Option<Budget> {
        Some(Budget {
            bytes: mib * M,
            source: Source::Given,
        })
    }

    #[test]
    fn without_pressure_guidance_is_batched_and_the_decode_whole() {
        let p = plan(
            &Fake {
                latent: (64, 64),
                tileable: true,
            },
            true,
            None,
        )
        .unwrap();
        assert!(!p.split_guidance && p.tiling.is_none());
        // The whole 64x64 decode (1024 MiB of compute) is the peak.
        assert_eq!(p.peak(), OVERHEAD + 50 * M + 1024 * M + M);
    }

    #[test]
    fn a_tight_budget_splits_guidance_and_tiles_the_decode_within_it() {
        let f = Fake {
            latent: (64, 64),
            tileable: true,
        };
        let p = plan(&f, true, budget(560)).unwrap();
        assert!(p.split_guidance, "batch 2 needs 500 + overhead > 560");
        let t = p.tiling.expect("a tiled decode");
        assert!(p.peak() <= 560 * M, "{}", p.summary());
        // The cheapest fitting tiling: full-width strips beat square tiles.
        assert!(t.cost(64, 64) < 1.6, "{t:?}");
        assert!(p.summary().contains("tiles"));
    }

    #[test]
    fn a_budget_below_the_unets_weights_leaves_them_to_the_page_cache_last() {
        let f = Fake {
            latent: (16, 16),
            tileable: true,
        };
        // Splitting guidance is enough for 500 MiB (300 + 100 + 64): no streaming.
        let p = plan(&f, true, budget(500)).unwrap();
        assert!(p.split_guidance && !p.stream_unet, "{}", p.summary());
        // 420 MiB is below the resident UNet even split: its weights stream, and the
        // batch of 2 fits beside them (10 + 200 + 64).
        let p = plan(&f, true, budget(420)).unwrap();
        assert!(p.stream_unet && !p.split_guidance, "{}", p.summary());
        assert!(p.peak() <= 420 * M && p.summary().contains("read from the file"));
        // 250 MiB: streamed and split (10 + 100 + 64).
        let p = plan(&f, true, budget(250)).unwrap();
        assert!(p.stream_unet && p.split_guidance, "{}", p.summary());
    }

    #[test]
    fn an_impossible_budget_is_refused_naming_the_stage() {
        let f = Fake {
            latent: (64, 64),
            tileable: true,
        };
        // 80 + 20 for the text fits 170 with the process's 64; the UNet, streamed and
        // split, needs 10 + 100 and the 64.
        let e = plan(&f, true, budget(170)).unwrap_err().to_string();
        assert!(
            e.contains("unet stage") && e.contains("170 MiB") && e.contains("read from the file"),
            "{e}"
        );
        let e = plan(
            &Fake {
                latent: (64, 64),
                tileable: false,
            },
            false,
            budget(700),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("decode stage"), "{e}");
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("768M"), Some(768 << 20));
        assert_eq!(parse_size("768MiB"), Some(768 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        for bad in ["", "M", "12Q", "-5M", "1e99G"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn tiles_cover_the_latent_with_the_overlap_kept() {
        for (len, tile) in [(64, 16), (64, 40), (48, 24), (96, 64), (17, 16)] {
            let s = Tiling::starts(len, tile, TILE_OVERLAP);
            assert_eq!(s[0], 0);
            assert_eq!(*s.last().unwrap() + tile, len);
            for p in s.windows(2) {
                assert!(p[0] + tile >= p[1] + TILE_OVERLAP, "{len} {tile}: {s:?}");
            }
        }
        assert_eq!(Tiling::starts(32, 64, 8), vec![0]);
    }
}
