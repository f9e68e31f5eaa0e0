//! ESRGAN-family super-resolution networks, read from their own weights:
//!
//! - RRDBNet (Wang et al. 2018, "ESRGAN"; Real-ESRGAN's x4plus, x4plus-anime-6B and
//!   x2plus): a 3x3 convolution, residual-in-residual dense blocks, a convolution
//!   added back, nearest-neighbour doublings each followed by a convolution, two more
//!   convolutions; LeakyReLU(0.2) throughout. Real-ESRGAN's x2 and x1 models fold the
//!   input into channels first (pixel unshuffle by 2 or 4) and keep the two doublings.
//!   basicsr's names (`conv_first`, `body.N.rdbK.convM`, `conv_body`, `conv_up1`,
//!   `conv_hr`, `conv_last`) and the original ESRGAN release's (`model.0`,
//!   `model.1.sub.N.RDBK.convM.0`, `model.3` …) are both read.
//! - SRVGGNetCompact (Real-ESRGAN's realesr-general-x4v3 and realesr-animevideov3):
//!   `body.0` a 3x3 convolution, then PReLU and convolution in turn, the last
//!   convolution's channels folded into an image `scale` times larger (pixel shuffle)
//!   and added to the input upsampled by nearest neighbour.
//!
//! Every layer is a convolution or pointwise, so images of any size go through in
//! overlapping tiles ([`tile`](super::tile)) with one tile's compute buffer.
use crate::error::{Error, Result};
use crate::formats::Checkpoint;
use crate::ggml::{Backend, Context, Tensor};

use super::nn::{Nn, Program};
use super::tile::{self, Tiling};
use super::Weights;

/// LeakyReLU's slope in both families (basicsr's `negative_slope=0.2`).
const SLOPE: f32 = 0.2;
/// A dense block's and an RRDB's residual scale (basicsr's `* 0.2 + x`).
const RESIDUAL: f32 = 0.2;
/// Tensor objects one graph may hold: x4plus has 23 RRDBs of 15 convolutions.
const MAX_TENSORS: usize = 1 << 15;

pub use crate::config::UpscalerArch as Arch;

/// A tensor name of the original ESRGAN release as basicsr names it, or `None` when
/// the name is basicsr's already. `ups` are the release's `model.K` indices after the
/// trunk, in order: the doublings' convolutions, then `conv_hr`, then `conv_last`.
fn basicsr_name(name: &str, ups: &[usize]) -> Option<String> {
    let rest = name.strip_prefix("model.")?;
    let (index, param) = rest.split_once('.')?;
    if index == "0" {
        return Some(format!("conv_first.{param}"));
    }
    if index == "1" {
        // model.1.sub.N.RDBK.convM.0.weight, or model.1.sub.<last>.weight (conv_body).
        let sub = param.strip_prefix("sub.")?;
        let (n, inner) = sub.split_once('.')?;
        if let Some(rdb) = inner.strip_prefix("RDB") {
            let (k, conv) = rdb.split_once('.')?;
            let conv = conv.replacen(".0.", ".", 1);
            return Some(format!("body.{n}.rdb{k}.{conv}"));
        }
        return Some(format!("conv_body.{inner}"));
    }
    let k: usize = index.parse().ok()?;
    let pos = ups.iter().position(|&u| u == k)?;
    let n = ups.len();
    let layer = if pos + 2 == n {
        "conv_hr".to_string()
    } else if pos + 1 == n {
        "conv_last".to_string()
    } else {
        format!("conv_up{}", pos + 1)
    };
    Some(format!("{layer}.{param}"))
}

/// How this module names a checkpoint's tensors: Real-ESRGAN's `params_ema.` (else
/// `params.`) level dropped (with the tensors outside it), the original release's
/// names turned into basicsr's. One entry per name: its new name, or `None` to leave
/// it out.
fn renames(names: &[&str]) -> Vec<Option<String>> {
    let level = ["params_ema.", "params."]
        .into_iter()
        .find(|p| names.iter().any(|n| n.starts_with(p)));
    let stripped: Vec<Option<&str>> = names
        .iter()
        .map(|n| match level {
            Some(p) => n.strip_prefix(p),
            None => Some(*n),
        })
        .collect();
    let mut ups: Vec<usize> = stripped
        .iter()
        .flatten()
        .filter_map(|n| {
            let rest = n.strip_prefix("model.")?;
            let k: usize = rest.split('.').next()?.parse().ok()?;
            (k > 1 && rest.ends_with(".weight") && rest.matches('.').count() == 1).then_some(k)
        })
        .collect();
    ups.sort_unstable();
    ups.dedup();
    stripped
        .into_iter()
        .map(|n| n.map(|n| basicsr_name(n, &ups).unwrap_or_else(|| n.to_string())))
        .collect()
}

/// `ck`'s tensors under the names this module reads ([`renames`]).
pub fn normalize_checkpoint(ck: &mut Checkpoint) {
    let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
    let new = renames(&names);
    let tensors = std::mem::take(&mut ck.tensors);
    ck.tensors = tensors
        .into_iter()
        .zip(new)
        .filter_map(|(mut t, n)| {
            t.name = n?;
            Some(t)
        })
        .collect();
}

/// Whether tensors named `names` (as stored) are an ESRGAN-family network's: the
/// first convolution of an RRDBNet, or a compact network's first convolution and
/// PReLU, and nothing of a diffusion model.
pub fn looks_like(names: &[&str]) -> bool {
    let new: Vec<String> = renames(names).into_iter().flatten().collect();
    let has = |n: &str| new.iter().any(|m| m == n);
    let diffusion = names
        .iter()
        .any(|n| n.starts_with("model.diffusion_model.") || n.starts_with("first_stage_model."));
    !diffusion && (has("conv_first.weight") || (has("body.0.weight") && has("body.1.weight")))
}

/// An upscaler checkpoint with its tensors renamed ([`normalize_checkpoint`]) and its
/// network recognised (from f32 copies of its weights, dropped on return).
pub fn read_checkpoint(path: &std::path::Path) -> Result<(Checkpoint, Arch)> {
    let mut ck = Checkpoint::open(path)?;
    normalize_checkpoint(&mut ck);
    let backend = Backend::cpu(1)?;
    let arch = detect(&Weights::from_checkpoint(&ck, &backend)?)?;
    Ok((ck, arch))
}

/// A convolution weight's (out, in) channels; `ne` in ggml order, 4-D `[k, k, in, out]`.
fn conv_io(w: &Weights<'_>, name: &str) -> Result<(usize, usize)> {
    let ne = w.get(&format!("{name}.weight"))?.ne();
    Ok((ne[3], ne[2]))
}

fn count(w: &Weights<'_>, name: impl Fn(usize) -> String) -> usize {
    (0..).take_while(|&i| w.opt(&name(i)).is_some()).count()
}

/// Which network `w` holds (names as [`normalize`] gives them).
pub fn detect(w: &Weights<'_>) -> Result<Arch> {
    let bad = |m: String| Err(Error::format(w.path(), m));
    if w.opt("conv_first.weight").is_some() {
        let (features, inputs) = conv_io(w, "conv_first")?;
        let unshuffle = match inputs {
            3 => 1,
            12 => 2,
            48 => 4,
            n => return bad(format!("an RRDBNet whose first convolution takes {n} channels (3, 12 or 48: RGB, or RGB folded by 2 or 4)")),
        };
        let blocks = count(w, |i| format!("body.{i}.rdb1.conv1.weight"));
        let (grow, _) = conv_io(w, "body.0.rdb1.conv1")?;
        let doublings = count(w, |i| format!("conv_up{}.weight", i + 1));
        if blocks == 0 || doublings == 0 || (1 << doublings) < unshuffle {
            return bad(format!(
                "an RRDBNet with {blocks} blocks and {doublings} upsampling convolutions"
            ));
        }
        let (out, _) = conv_io(w, "conv_last")?;
        if out != 3 {
            return bad(format!("an RRDBNet giving {out} channels, not RGB"));
        }
        return Ok(Arch::Rrdb {
            features,
            blocks,
            grow,
            unshuffle,
            doublings,
        });
    }
    if w.opt("body.0.weight").is_some() {
        let (features, inputs) = conv_io(w, "body.0")?;
        let layers = count(w, |i| format!("body.{i}.weight"));
        if inputs != 3 || layers < 3 || layers.is_multiple_of(2) {
            return bad(format!(
                "a compact (SRVGG) network of {layers} layers taking {inputs} channels"
            ));
        }
        let slopes = w.get("body.1.weight")?.ne();
        if slopes[0] != features || slopes[1] != 1 {
            return bad("a compact (SRVGG) network without PReLU activations: sdrs reads the published PReLU ones".into());
        }
        let (out, _) = conv_io(w, &format!("body.{}", layers - 1))?;
        let scale = (1..=8).find(|s| 3 * s * s == out);
        let Some(scale) = scale else {
            return bad(format!(
                "a compact (SRVGG) network whose last convolution gives {out} channels (3·scale²)"
            ));
        };
        return Ok(Arch::Compact {
            features,
            convs: (layers - 3) / 2,
            scale,
        });
    }
    bad("not an ESRGAN-family upscaler (no `conv_first` of an RRDBNet, no `body.0` of a compact network)".into())
}

/// `[W, H, C·r², 1]` to `[W·r, H·r, C, 1]`, PyTorch's `pixel_shuffle` (channel
/// `c·r² + i·r + j` becomes pixel (r·y + i, r·x + j) of channel c).
fn pixel_shuffle<'c>(c: &'c Context<'c>, x: Tensor<'c>, r: usize) -> Result<Tensor<'c>> {
    let [w, h, ch, _] = x.ne();
    let oc = ch / (r * r);
    // j next to x, then i next to y.
    let t = c.reshape(x, &[w, h, r, r * oc])?;
    let t = c.cont(c.permute(t, [1, 2, 0, 3])?)?; // [j, W, H, (i, c)]
    let t = c.reshape(t, &[w * r, h, r, oc])?;
    let t = c.cont(c.permute(t, [0, 2, 1, 3])?)?; // [OW, i, H, c]
    c.reshape(t, &[w * r, h * r, oc, 1])
}

/// The inverse, PyTorch's `pixel_unshuffle`.
fn pixel_unshuffle<'c>(c: &'c Context<'c>, x: Tensor<'c>, r: usize) -> Result<Tensor<'c>> {
    let [w, h, ch, _] = x.ne();
    let x = if x.is_contiguous() { x } else { c.cont(x)? };
    // i out of y, then j out of x: channel j + r·i + r²·c.
    let t = c.reshape(x, &[w, r, h / r, ch])?;
    let t = c.cont(c.permute(t, [0, 2, 1, 3])?)?; // [W, H/r, i, c]
    let t = c.reshape(t, &[r, w / r, h / r, r * ch])?;
    let t = c.cont(c.permute(t, [2, 0, 1, 3])?)?; // [W/r, H/r, j, (i, c)]
    c.reshape(t, &[w / r, h / r, r * r * ch, 1])
}

fn lrelu<'c>(nn: &Nn<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
    nn.ctx.leaky_relu(x, SLOPE)
}

/// `x·s + y`.
fn scaled_add<'c>(c: &'c Context<'c>, x: Tensor<'c>, s: f32, y: Tensor<'c>) -> Result<Tensor<'c>> {
    c.add(c.scale(x, s)?, y)
}

/// basicsr's `ResidualDenseBlock`: each convolution sees the input and every earlier
/// output, concatenated.
fn dense_block<'c>(nn: &Nn<'c>, x: Tensor<'c>, p: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let mut seen = x;
    for m in 1..=4 {
        let y = lrelu(nn, nn.conv(seen, &format!("{p}.conv{m}"), 3, 1, 1)?)?;
        seen = c.concat(seen, y, 2)?;
    }
    let y = nn.conv(seen, &format!("{p}.conv5"), 3, 1, 1)?;
    scaled_add(c, y, RESIDUAL, x)
}

fn rrdbnet<'c>(nn: &Nn<'c>, x: Tensor<'c>, arch: &Arch) -> Result<Tensor<'c>> {
    let Arch::Rrdb {
        blocks,
        unshuffle,
        doublings,
        ..
    } = *arch
    else {
        return Err(Error::Invalid("not an RRDBNet".into()));
    };
    let c = nn.ctx;
    let x = if unshuffle > 1 {
        pixel_unshuffle(c, x, unshuffle)?
    } else {
        x
    };
    let feat = nn.conv(x, "conv_first", 3, 1, 1)?;
    let mut h = feat;
    for i in 0..blocks {
        let mut r = h;
        for k in 1..=3 {
            r = dense_block(nn, r, &format!("body.{i}.rdb{k}"))?;
        }
        h = scaled_add(c, r, RESIDUAL, h)?;
    }
    let mut h = c.add(feat, nn.conv(h, "conv_body", 3, 1, 1)?)?;
    for k in 1..=doublings {
        h = lrelu(nn, nn.upsample_conv(h, &format!("conv_up{k}"))?)?;
    }
    let h = lrelu(nn, nn.conv(h, "conv_hr", 3, 1, 1)?)?;
    nn.conv(h, "conv_last", 3, 1, 1)
}

/// PReLU with per-channel slopes `name.weight`.
fn prelu<'c>(nn: &Nn<'c>, x: Tensor<'c>, name: &str) -> Result<Tensor<'c>> {
    let c = nn.ctx;
    let a = nn.w.get(&format!("{name}.weight"))?;
    let a = c.reshape(a, &[1, 1, a.ne()[0], 1])?;
    let pos = c.relu(x)?;
    // relu(x) + a·(x − relu(x)).
    let neg = c.add(x, c.scale(pos, -1.0)?)?;
    c.add(pos, c.mul(neg, a)?)
}

fn compact<'c>(nn: &Nn<'c>, x: Tensor<'c>, arch: &Arch) -> Result<Tensor<'c>> {
    let Arch::Compact { convs, scale, .. } = *arch else {
        return Err(Error::Invalid("not a compact network".into()));
    };
    let c = nn.ctx;
    let mut h = x;
    for i in 0..=convs {
        h = nn.conv(h, &format!("body.{}", 2 * i), 3, 1, 1)?;
        h = prelu(nn, h, &format!("body.{}", 2 * i + 1))?;
    }
    let h = nn.conv(h, &format!("body.{}", 2 * convs + 2), 3, 1, 1)?;
    let up = pixel_shuffle(c, h, scale)?;
    c.add(up, c.upscale_nearest(x, scale)?)
}

fn network<'c>(nn: &Nn<'c>, x: Tensor<'c>, arch: &Arch) -> Result<Tensor<'c>> {
    match arch {
        Arch::Rrdb { .. } => rrdbnet(nn, x, arch),
        Arch::Compact { .. } => compact(nn, x, arch),
    }
}

/// Pixels of overlap between tiles: far less than the networks' reach, but their
/// published inference (Real-ESRGAN's `tile_pad` 10) shows seams vanish well before.
pub const OVERLAP: usize = 16;

/// How a `w`x`h` picture is cut for tiles of `tile` pixels, in units of the fold (so
/// every tile folds whole), and the padded size.
fn tiling(arch: &Arch, tile: usize, (w, h): (usize, usize)) -> (Tiling, (usize, usize)) {
    let u = arch.unit();
    let (pw, ph) = (w.next_multiple_of(u), h.next_multiple_of(u));
    let side = (tile / u).max(1);
    let overlap = OVERLAP.div_ceil(u).min(side / 2);
    (
        Tiling::square(side, overlap).clamp(pw / u, ph / u),
        (pw, ph),
    )
}

/// The compute buffer of one tile of a `w`x`h` picture cut into tiles of `tile` pixels.
pub fn tile_bytes(
    w: &Weights<'_>,
    arch: &Arch,
    tile: usize,
    size: (usize, usize),
) -> Result<usize> {
    let (t, _) = tiling(arch, tile, size);
    let u = arch.unit();
    Program::measure(
        w,
        [t.tile_w * u, t.tile_h * u, 3, 1],
        MAX_TENSORS,
        |nn, x| network(nn, x, arch),
    )
}

/// Upscales RGB planes `[3][h][w]` (values in [0, 1]) by the network's scale, in tiles
/// of `tile` pixels (the whole image when it fits one); `tick(done, total)` after each
/// tile. Sides that are not multiples of an RRDBNet's fold are padded by repeating
/// the edge, and the padding cut from the result.
pub fn upscale(
    w: &Weights<'_>,
    arch: &Arch,
    rgb: &[f32],
    (width, height): (usize, usize),
    tile: usize,
    backend: &Backend,
    tick: tile::Tick<'_>,
) -> Result<Vec<f32>> {
    if rgb.len() != 3 * width * height || width == 0 || height == 0 {
        return Err(Error::Invalid(format!(
            "{} values for a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    let u = arch.unit();
    let (t, (pw, ph)) = tiling(arch, tile, (width, height));
    let padded;
    let input = if (pw, ph) == (width, height) {
        rgb
    } else {
        padded = pad_edges(rgb, (width, height), (pw, ph));
        &padded
    };
    let program = Program::new(
        w,
        [t.tile_w * u, t.tile_h * u, 3, 1],
        MAX_TENSORS,
        |nn, x| network(nn, x, arch),
    )?;
    let s = arch.scale();
    let out = tile::run(
        &program,
        input,
        &tile::Shape {
            n: 1,
            c_in: 3,
            c_out: 3,
            lw: pw / u,
            lh: ph / u,
            f_in: u,
            f_out: u * s,
        },
        t,
        backend,
        tick,
    )?;
    if (pw, ph) == (width, height) {
        return Ok(out);
    }
    let (ow, oh) = (width * s, height * s);
    let mut cut = Vec::with_capacity(3 * ow * oh);
    for ch in 0..3 {
        for y in 0..oh {
            let from = (ch * ph * s + y) * pw * s;
            cut.extend_from_slice(&out[from..from + ow]);
        }
    }
    Ok(cut)
}

/// `[3][h][w]` planes grown to `[3][ph][pw]` by repeating the last row and column.
fn pad_edges(rgb: &[f32], (w, h): (usize, usize), (pw, ph): (usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; 3 * pw * ph];
    for ch in 0..3 {
        for y in 0..ph {
            let sy = y.min(h - 1);
            for x in 0..pw {
                out[(ch * ph + y) * pw + x] = rgb[(ch * h + sy) * w + x.min(w - 1)];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_esrgan_names_become_basicsrs() {
        let ups = [3, 6, 8, 10];
        let n = |s: &str| basicsr_name(s, &ups);
        assert_eq!(n("model.0.weight").as_deref(), Some("conv_first.weight"));
        assert_eq!(
            n("model.1.sub.4.RDB2.conv3.0.bias").as_deref(),
            Some("body.4.rdb2.conv3.bias")
        );
        assert_eq!(
            n("model.1.sub.23.weight").as_deref(),
            Some("conv_body.weight")
        );
        assert_eq!(n("model.3.weight").as_deref(), Some("conv_up1.weight"));
        assert_eq!(n("model.6.bias").as_deref(), Some("conv_up2.bias"));
        assert_eq!(n("model.8.weight").as_deref(), Some("conv_hr.weight"));
        assert_eq!(n("model.10.weight").as_deref(), Some("conv_last.weight"));
        assert_eq!(n("conv_first.weight"), None);
    }

    #[test]
    fn edge_padding_repeats_the_last_row_and_column() {
        let rgb: Vec<f32> = (0..3 * 2 * 3).map(|v| v as f32).collect(); // 3x2 per plane
        let p = pad_edges(&rgb, (3, 2), (4, 4));
        assert_eq!(
            &p[..16],
            &[0., 1., 2., 2., 3., 4., 5., 5., 3., 4., 5., 5., 3., 4., 5., 5.]
        );
    }
}
