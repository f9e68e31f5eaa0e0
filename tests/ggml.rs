//! The safe ggml wrapper: weights used in place from a memory-mapped GGUF.
mod common;

use common::*;
use sdrs::formats::gguf::GgufFile;
use sdrs::formats::DType;
use sdrs::ggml::{Backend, Context, ConvShape, NormAct, Type};
use sdrs::synth::Format;

fn matmul_ref(w: &[f32], x: &[f32], k: usize, n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for j in 0..m {
        for i in 0..n {
            out[j * n + i] = (0..k)
                .map(|p| w[i * k + p] as f64 * x[j * k + p] as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

#[test]
fn quantized_conv_kernels_from_the_mapping_multiply_like_their_dequantized_values() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth_tiny("tiny-sd15", Format::Safetensors, DType::F32, dir.path());
    // (type, bound on relative RMS error vs the f32 product of the dequantized weights;
    // ggml quantizes the activations to q8 for integer dot products)
    for (t, bound) in [(Type::Q8_0, 0.01), (Type::Q4_0, 0.01), (Type::F16, 2e-3)] {
        let out = dir.path().join(format!("{}.gguf", t.name()));
        convert_to(&src, t, &out).unwrap();
        let g = GgufFile::open(&out).unwrap();
        let name = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
        let info = g.tensor(name).unwrap();
        assert_eq!(info.ty, t);
        let (k, n) = (info.ne[0] as usize, info.ne[1] as usize);
        assert_eq!(
            k,
            32 * 3 * 3,
            "3x3 kernel stored as a [in*kh*kw, out] matrix"
        );
        let m = 7;
        let x: Vec<f32> = (0..k * m)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();

        let backend = Backend::cpu(2).unwrap();
        let ctx = Context::new(8).unwrap();
        let w = ctx.tensor(info.ty, &[k, n], name).unwrap();
        let xin = ctx.tensor(Type::F32, &[k, m], "x").unwrap();
        let y = ctx.mul_mat(w, xin).unwrap();
        let graph = ctx.graph(&[y]).unwrap();
        let region = ctx.borrow_host(g.bytes()).unwrap();
        ctx.place(&region, w, (g.data_offset + info.offset) as usize)
            .unwrap();
        ctx.alloc_cpu(&backend).unwrap();
        ctx.set_f32(xin, &x).unwrap();
        assert!(
            ctx.set_bytes(w, g.data(info)).is_err(),
            "mapped weights are read-only"
        );
        backend.compute(&graph).unwrap();
        let got = ctx.get_f32(y).unwrap();

        let wf = info.ty.dequantize(g.data(info), k * n).unwrap();
        let want = matmul_ref(&wf, &x, k, n, m);
        let err = rel_rms(&want, &got);
        eprintln!("{}: relative RMS error {err:.2e}", t.name());
        assert!(err < bound, "{}: {err}", t.name());
    }
}

#[test]
fn placing_a_tensor_outside_its_region_is_refused() {
    // a 32-byte aligned window of 256 bytes
    let raw: Vec<u8> = vec![0u8; 256 + 32];
    let skip = (32 - raw.as_ptr() as usize % 32) % 32;
    let aligned = &raw[skip..skip + 256];
    let ctx = Context::new(2).unwrap();
    let t = ctx.tensor(Type::F32, &[32, 2], "t").unwrap();
    assert!(
        ctx.borrow_host(&raw[skip + 1..]).is_err(),
        "misaligned memory is refused, not aborted on"
    );
    let region = ctx.borrow_host(aligned).unwrap();
    assert!(ctx.place(&region, t, 200).is_err(), "out of bounds");
    assert!(ctx.place(&region, t, 4).is_err(), "misaligned offset");
    ctx.place(&region, t, 0).unwrap();
    assert!(
        ctx.tensor(Type::Q4_0, &[33], "bad").is_err(),
        "partial block"
    );
}

/// Direct convolution: x [N, IC, H, W] (row-major, PyTorch order), w [OC, IC, kh, kw].
fn conv_ref(
    x: &[f32],
    [n, ic, h, w]: [usize; 4],
    k: &[f32],
    oc: usize,
    shape: ConvShape,
) -> (Vec<f32>, usize, usize) {
    let ConvShape {
        kh,
        kw,
        stride: s,
        pad: p,
        ..
    } = shape;
    let oh = (h + 2 * p - kh) / s + 1;
    let ow = (w + 2 * p - kw) / s + 1;
    let mut out = vec![0f32; n * oc * oh * ow];
    for b in 0..n {
        for o in 0..oc {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut acc = 0f64;
                    for c in 0..ic {
                        for i in 0..kh {
                            for j in 0..kw {
                                let (yy, xi) = (
                                    (y * s + i) as isize - p as isize,
                                    (xx * s + j) as isize - p as isize,
                                );
                                if yy < 0 || xi < 0 || yy >= h as isize || xi >= w as isize {
                                    continue;
                                }
                                acc += x[((b * ic + c) * h + yy as usize) * w + xi as usize] as f64
                                    * k[((o * ic + c) * kh + i) * kw + j] as f64;
                            }
                        }
                    }
                    out[((b * oc + o) * oh + y) * ow + xx] = acc as f32;
                }
            }
        }
    }
    (out, oh, ow)
}

/// A convolution's test input `[N][C][H][W]`, and the same upsampled 2x (nearest), as
/// an upsampling layer's convolution reads it.
fn conv_inputs([n, ic, h, w]: [usize; 4]) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..n * ic * h * w)
        .map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0)
        .collect();
    let x2 = (0..n * ic * 4 * h * w)
        .map(|i| {
            let (xx, yy, rest) = (i % (2 * w), i / (2 * w) % (2 * h), i / (4 * h * w));
            x[rest * h * w + yy / 2 * w + xx / 2]
        })
        .collect();
    (x, x2)
}

#[test]
fn conv2d_through_im2col_matches_direct_convolution_in_one_piece_in_row_bands_and_upsampled() {
    // 21 output channels: a whole block of the epilogue's 16 and a partial one.
    let (n, ic, h, w, oc) = (2, 8, 9, 7, 21);
    let bias_values: Vec<f32> = (0..oc).map(|c| c as f32 * 0.25 - 2.0).collect();
    let (x, x2) = conv_inputs([n, ic, h, w]);
    // Budgets: one piece; about 3 bands of output rows; one row per band.
    for budget in [usize::MAX, 2 * ic * 9 * w * n * 4, 1] {
        for ty in [Type::F32, Type::F16, Type::BF16] {
            for (kh, s, p, up) in [
                (3, 1, 1, 1),
                (3, 2, 1, 1),
                (1, 1, 0, 1),
                (3, 1, 0, 1),
                (3, 1, 1, 2),
                (3, 2, 0, 2),
                (1, 1, 0, 2),
            ] {
                let shape = ConvShape::square(kh, s, p).upsampled(up);
                let k: Vec<f32> = (0..oc * ic * kh * kh)
                    .map(|i| ((i * 17 % 53) as f32 / 26.0) - 1.0)
                    .collect();
                // bf16 kernels take bf16 columns: the reference multiplies the inputs
                // rounded to bf16 (to nearest even, as ggml rounds), so only the order
                // of the f32 sums may differ.
                let bf16 = |v: &[f32]| -> Vec<f32> {
                    v.iter()
                        .map(|&a| half::bf16::from_f32(a).to_f32())
                        .collect()
                };
                let (xr, x2r, kr) = match ty {
                    Type::BF16 => (bf16(&x), bf16(&x2), bf16(&k)),
                    _ => (x.clone(), x2.clone(), k.clone()),
                };
                let (want, oh, ow) = match up {
                    1 => conv_ref(&xr, [n, ic, h, w], &kr, oc, shape),
                    _ => conv_ref(&x2r, [n, ic, 2 * h, 2 * w], &kr, oc, shape),
                };
                let ctx = Context::new(256).unwrap();
                ctx.set_conv_budget(budget);
                let xin = ctx.tensor(Type::F32, &[w, h, ic, n], "x").unwrap();
                let kin = ctx.tensor(ty, &[ic * kh * kh, oc], "k").unwrap();
                let bias = ctx.tensor(Type::F32, &[oc], "b").unwrap();
                for t in [xin, kin, bias] {
                    ctx.set_input(t);
                }
                let y = ctx.conv2d(xin, kin, shape, Some(bias)).unwrap();
                assert_eq!(y.ne(), [ow, oh, oc, n]);
                let g = ctx.graph(&[y]).unwrap();
                // Only the products count as arithmetic, not the data movement around them.
                let flops = 2 * ic * kh * kh * oc * ow * oh * n;
                assert_eq!(g.matmul_flops(), flops as f64);
                ctx.alloc_graph(&g).unwrap();
                ctx.set_f32(xin, &x).unwrap();
                let mut kb = Vec::new();
                ty.quantize_rows(&k, oc, ic * kh * kh, &mut kb).unwrap();
                ctx.set_bytes(kin, &kb).unwrap();
                ctx.set_f32(bias, &bias_values).unwrap();
                Backend::cpu(2).unwrap().compute(&g).unwrap();
                let got = ctx.get_f32(y).unwrap();
                let want: Vec<f32> = want
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias_values[(i / (oh * ow)) % oc])
                    .collect();
                // f16 kernels take f16 columns: activations rounded to f16 too.
                let tol = match ty {
                    Type::F16 => 2e-3,
                    Type::BF16 => 1e-5,
                    _ => 1e-6,
                };
                let e = rel_rms(&want, &got);
                assert!(
                    e < tol,
                    "{} k{kh} s{s} p{p} up{up}, budget {budget}: {e}",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn winograd_conv_with_its_kernel_transformed_in_the_graph_matches_direct_convolution() {
    // Sizes no multiple of the 4x4 output tile, two images, an upsampled input, and
    // each kernel type the transform reads (the reference takes the kernel as stored).
    let (n, ic, h, w, oc) = (2, 16, 9, 7, 10);
    let bias_values: Vec<f32> = (0..oc).map(|c| c as f32 * 0.25 - 1.0).collect();
    let (x, x2) = conv_inputs([n, ic, h, w]);
    let k: Vec<f32> = (0..oc * ic * 9)
        .map(|i| ((i * 17 % 53) as f32 / 26.0) - 1.0)
        .collect();
    for ty in [Type::F32, Type::F16, Type::BF16] {
        let stored: Vec<f32> = match ty {
            Type::F16 => k.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            Type::BF16 => k
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
            _ => k.clone(),
        };
        for up in [1, 2] {
            let shape = ConvShape::square(3, 1, 1);
            let (want, oh, ow) = match up {
                1 => conv_ref(&x, [n, ic, h, w], &stored, oc, shape),
                _ => conv_ref(&x2, [n, ic, 2 * h, 2 * w], &stored, oc, shape),
            };
            let ctx = Context::new(64).unwrap();
            let xin = ctx.tensor(Type::F32, &[w, h, ic, n], "x").unwrap();
            let kin = ctx.tensor(ty, &[ic * 9, oc], "k").unwrap();
            let bias = ctx.tensor(Type::F32, &[oc], "b").unwrap();
            for t in [xin, kin, bias] {
                ctx.set_input(t);
            }
            let u = ctx.winograd_kernel(kin).unwrap();
            let y = ctx.conv3x3_winograd(xin, u, up, Some(bias)).unwrap();
            assert_eq!(y.ne(), [ow, oh, oc, n]);
            let g = ctx.graph(&[y]).unwrap();
            ctx.alloc_graph(&g).unwrap();
            ctx.set_f32(xin, &x).unwrap();
            let mut kb = Vec::new();
            ty.quantize_rows(&k, oc, ic * 9, &mut kb).unwrap();
            ctx.set_bytes(kin, &kb).unwrap();
            ctx.set_f32(bias, &bias_values).unwrap();
            Backend::cpu(2).unwrap().compute(&g).unwrap();
            let got = ctx.get_f32(y).unwrap();
            let want: Vec<f32> = want
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias_values[(i / (oh * ow)) % oc])
                .collect();
            // f32 throughout; the transforms for ±2 amplify rounding (2.5e-6 measured).
            let e = rel_rms(&want, &got);
            assert!(e < 1e-5, "{} up {up}: {e}", ty.name());
        }
    }
}

#[test]
fn winograd_ops_refuse_what_they_cannot_read() {
    let ctx = Context::new(32).unwrap();
    let x = ctx.tensor(Type::F32, &[8, 8, 16, 1], "x").unwrap();
    let q8 = ctx.tensor(Type::Q8_0, &[32 * 9, 4], "q8").unwrap();
    assert!(ctx.winograd_kernel(q8).is_err(), "no quantized kernels");
    let k1 = ctx.tensor(Type::F16, &[20, 4], "k").unwrap();
    assert!(ctx.winograd_kernel(k1).is_err(), "not a 3x3 kernel");
    let u = ctx.tensor(Type::F32, &[8, 4, 36], "u").unwrap();
    assert!(
        ctx.conv3x3_winograd(x, u, 1, None).is_err(),
        "kernel for 8 channels on 16"
    );
    let u = ctx.tensor(Type::F32, &[16, 4, 36], "u16").unwrap();
    let b = ctx.tensor(Type::F32, &[5], "b").unwrap();
    assert!(
        ctx.conv3x3_winograd(x, u, 1, Some(b)).is_err(),
        "bias of 5 for 4"
    );
    assert!(ctx.conv3x3_winograd(x, u, 0, None).is_err());
    // The kernel reads upsampled pixels by shifting.
    assert!(ctx.conv3x3_winograd(x, u, 3, None).is_err());
    assert!(ctx
        .conv3x3_winograd(ctx.cast(x, Type::F16).unwrap(), u, 1, None)
        .is_err());
    assert!(ctx.conv3x3_winograd(x, u, 2, None).is_ok());
}

#[test]
fn fused_group_norm_matches_group_norm_then_scale_shift_and_silu_in_place_or_not() {
    // 12 channels in 4 groups of 3, odd planes, two images; a large common offset
    // tests that the statistics keep their precision.
    let (w, h, c, n, groups, eps) = (7, 9, 12, 2, 4, 1e-6f32);
    let x: Vec<f32> = (0..w * h * c * n)
        .map(|i| 300.0 + ((i * 37 % 101) as f32 / 25.0) * (1.0 + (i / (w * h)) as f32 * 0.3))
        .collect();
    let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.1).collect();
    let beta: Vec<f32> = (0..c).map(|i| i as f32 * 0.2 - 1.0).collect();
    let reference = |silu: bool| -> Vec<f32> {
        let (plane, cg) = (w * h, c / groups);
        let mut out = vec![0f32; x.len()];
        for b in 0..n {
            for g in 0..groups {
                let r = (b * c + g * cg) * plane..(b * c + (g + 1) * cg) * plane;
                let v = &x[r.clone()];
                let mean = v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
                let var =
                    v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
                for i in r {
                    let ch = i / plane % c;
                    let y = (x[i] as f64 - mean) / (var + eps as f64).sqrt() * gamma[ch] as f64
                        + beta[ch] as f64;
                    out[i] = if silu { y / (1.0 + (-y).exp()) } else { y } as f32;
                }
            }
        }
        out
    };
    for silu in [false, true] {
        for over in [false, true] {
            let ctx = Context::new(32).unwrap();
            let xin = ctx.tensor(Type::F32, &[w, h, c, n], "x").unwrap();
            let g = ctx.tensor(Type::F32, &[1, 1, c, 1], "g").unwrap();
            let b = ctx.tensor(Type::F32, &[1, 1, c, 1], "b").unwrap();
            for t in [xin, g, b] {
                ctx.set_input(t);
            }
            // Written over, the input must be a node's output: an input stays intact.
            let src = if over {
                ctx.scale(xin, 1.0).unwrap()
            } else {
                xin
            };
            let y = ctx
                .group_norm_act(src, groups, eps, g, b, NormAct { silu, over }, None)
                .unwrap();
            let graph = ctx.graph(&[y]).unwrap();
            ctx.alloc_graph(&graph).unwrap();
            ctx.set_f32(xin, &x).unwrap();
            ctx.set_f32(g, &gamma).unwrap();
            ctx.set_f32(b, &beta).unwrap();
            Backend::cpu(2).unwrap().compute(&graph).unwrap();
            // PyTorch's form, one f32 scale and shift per channel, loses a few bits
            // to the offset: 2.4e-6 here.
            let e = rel_rms(&reference(silu), &ctx.get_f32(y).unwrap());
            assert!(e < 1e-5, "silu {silu}, over {over}: {e}");
        }
        // Given the first image's statistics, summed in f64 elsewhere (in another order)
        // and rounded as the op rounds them, the op gives that image's values bit for
        // bit: what a tile normalised with the whole image's statistics relies on.
        let (plane, cg) = (w * h, c / groups);
        let first = &x[..c * plane];
        let mut stats = vec![0f32; 2 * c];
        for g in 0..groups {
            let v = &first[g * cg * plane..(g + 1) * cg * plane];
            let mean = v.iter().rev().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
            let (m, r) = sdrs::ggml::group_norm_statistics(mean, var, eps);
            stats[g * cg..(g + 1) * cg].fill(m);
            stats[c + g * cg..c + (g + 1) * cg].fill(r);
        }
        let ctx = Context::new(32).unwrap();
        let xin = ctx.tensor(Type::F32, &[w, h, c, 1], "x").unwrap();
        let g = ctx.tensor(Type::F32, &[1, 1, c, 1], "g").unwrap();
        let b = ctx.tensor(Type::F32, &[1, 1, c, 1], "b").unwrap();
        let st = ctx.tensor(Type::F32, &[1, 1, c, 2], "stats").unwrap();
        for t in [xin, g, b, st] {
            ctx.set_input(t);
        }
        let act = NormAct { silu, over: false };
        let given = ctx
            .group_norm_act(xin, groups, eps, g, b, act, Some(st))
            .unwrap();
        let own = ctx
            .group_norm_act(xin, groups, eps, g, b, act, None)
            .unwrap();
        let graph = ctx.graph(&[given, own]).unwrap();
        ctx.alloc_graph(&graph).unwrap();
        ctx.set_f32(xin, first).unwrap();
        ctx.set_f32(g, &gamma).unwrap();
        ctx.set_f32(b, &beta).unwrap();
        ctx.set_f32(st, &stats).unwrap();
        Backend::cpu(2).unwrap().compute(&graph).unwrap();
        assert!(
            ctx.get_f32(given).unwrap() == ctx.get_f32(own).unwrap(),
            "silu {silu}: given statistics differ from the op's own"
        );
        let short = ctx.tensor(Type::F32, &[1, 1, c, 1], "short").unwrap();
        assert!(ctx
            .group_norm_act(xin, groups, eps, g, b, act, Some(short))
            .is_err());
    }
}

#[test]
fn fused_geglu_matches_ggml_gelu_of_the_gate_times_the_value() {
    let (inner, n, b) = (40, 13, 2);
    let h: Vec<f32> = (0..2 * inner * n * b)
        .map(|i| ((i * 29 % 113) as f32 / 14.0) - 4.0)
        .collect();
    let ctx = Context::new(32).unwrap();
    let hin = ctx.tensor(Type::F32, &[2 * inner, n, b], "h").unwrap();
    ctx.set_input(hin);
    let fused = ctx.geglu(hin).unwrap();
    assert_eq!(fused.ne(), [inner, n, b, 1]);
    // ggml's own: each half made contiguous, its erf GELU, the product.
    let value = ctx
        .cont(ctx.view(hin, [inner, n, b, 1], [0, 0, 0, 0]).unwrap())
        .unwrap();
    let gate = ctx
        .cont(ctx.view(hin, [inner, n, b, 1], [inner, 0, 0, 0]).unwrap())
        .unwrap();
    let reference = ctx.mul(value, ctx.gelu(gate).unwrap()).unwrap();
    let graph = ctx.graph(&[fused, reference]).unwrap();
    ctx.alloc_graph(&graph).unwrap();
    ctx.set_f32(hin, &h).unwrap();
    Backend::cpu(2).unwrap().compute(&graph).unwrap();
    let (got, want) = (ctx.get_f32(fused).unwrap(), ctx.get_f32(reference).unwrap());
    let e = rel_rms(&want, &got);
    assert!(e < 1e-6, "{e}");
    assert!(ctx
        .geglu(ctx.tensor(Type::F32, &[7, 2], "odd").unwrap())
        .is_err());
}

#[test]
fn ops_refuse_shapes_that_would_abort_ggml() {
    let ctx = Context::new(16).unwrap();
    let a = ctx.tensor(Type::F32, &[4, 3], "a").unwrap();
    let b = ctx.tensor(Type::F32, &[5, 3], "b").unwrap();
    assert!(ctx.add(a, b).is_err());
    assert!(ctx.mul_mat(a, b).is_err());
    assert!(ctx.reshape(a, &[5, 2]).is_err());
    assert!(ctx.concat(a, b, 1).is_err());
    assert!(ctx
        .group_norm(ctx.reshape(a, &[1, 1, 12]).unwrap(), 5, 1e-6)
        .is_err());
    assert!(ctx.permute(a, [0, 0, 1, 2]).is_err());
    assert!(ctx.view(a, [4, 4, 1, 1], [0, 0, 0, 0]).is_err());
    // Element counts ggml's i64 cannot hold (a fuzzed file's shape, an empty dimension
    // hiding the rest from a product): refused, not an abort.
    assert!(ctx.tensor(Type::F32, &[32, 0, 1 << 62, 4], "huge").is_err());
    assert!(ctx.tensor(Type::F32, &[1 << 63], "negative").is_err());
}

#[test]
fn ops_refuse_operand_types_that_would_abort_ggml() {
    let ctx = Context::new(32).unwrap();
    let x = ctx.tensor(Type::F32, &[32, 4], "x").unwrap();
    let img = ctx.tensor(Type::F32, &[4, 4, 32, 1], "img").unwrap();
    let f16 = ctx.tensor(Type::F16, &[32], "f16").unwrap();
    let q8 = ctx.tensor(Type::Q8_0, &[32], "q8").unwrap();
    let q8k = ctx
        .tensor(Type::parse("q8_K").unwrap(), &[256, 4], "q8k")
        .unwrap();
    let i32v = ctx.tensor(Type::I32, &[4], "ids").unwrap();
    // The peer's f16 norm scale on f32 activations: ggml's binary op aborts on it.
    for e in [ctx.add(x, f16).err(), ctx.mul(x, q8).err()] {
        let e = e.expect("refused").to_string();
        assert!(e.contains("f32 one"), "{e}");
    }
    assert!(
        ctx.add(f16, ctx.tensor(Type::F32, &[32], "b").unwrap())
            .is_ok(),
        "an f16 operand with an f32 one is a kernel ggml has"
    );
    assert!(
        ctx.mul_mat(q8k, ctx.tensor(Type::F32, &[256, 2], "v").unwrap())
            .is_err(),
        "q8_K has no dot product"
    );
    assert!(ctx
        .mul_mat(
            ctx.tensor(Type::F32, &[32, 8], "w").unwrap(),
            ctx.tensor(Type::I32, &[32, 2], "iv").unwrap()
        )
        .is_err());
    assert!(ctx
        .norm(ctx.tensor(Type::F16, &[32, 2], "h").unwrap(), 1e-5)
        .is_err());
    assert!(ctx
        .group_norm(ctx.tensor(Type::F16, &[4, 4, 32, 1], "g").unwrap(), 8, 1e-5)
        .is_err());
    assert!(ctx.get_rows(q8k, i32v).is_err());
    assert!(ctx
        .conv2d(
            ctx.cast(img, Type::F16).unwrap(),
            ctx.tensor(Type::F16, &[288, 8], "k").unwrap(),
            ConvShape::square(3, 1, 1),
            None
        )
        .is_err());
}

#[test]
fn repacked_q4_matrices_multiply_like_the_plain_layout() {
    let backend = Backend::cpu(2).unwrap();
    for (ty, k, m, n) in [
        (Type::Q4_0, 256, 64, 40),
        (Type::Q4_K, 256, 64, 40),
        (Type::Q4_0, 32, 64, 128),
        (Type::Q4_0, 32, 32, 128),
        (Type::Q4_0, 64, 8, 3),
    ] {
        let wv: Vec<f32> = (0..k * m)
            .map(|i| ((i * 2654435761usize) % 10007) as f32 / 5003.5 - 1.0)
            .collect();
        let xv: Vec<f32> = (0..k * n)
            .map(|i| ((i * 40503usize) % 10007) as f32 / 5003.5 - 1.0)
            .collect();
        {
            let mut raw = Vec::new();
            ty.quantize_rows(&wv, m, k, &mut raw).unwrap();
            let run = |packed: bool| {
                let wctx = Context::new(4).unwrap();
                let w = wctx.tensor(ty, &[k, m], "w").unwrap();
                if packed {
                    wctx.alloc_repacked(&[(w, &raw[..])], |_| {}).unwrap();
                } else {
                    wctx.alloc_cpu(&backend).unwrap();
                    wctx.set_bytes(w, &raw).unwrap();
                }
                let ctx = Context::new(8).unwrap();
                let x = ctx.tensor(Type::F32, &[k, n], "x").unwrap();
                ctx.set_input(x);
                let y = ctx.mul_mat(w, x).unwrap();
                ctx.set_output(y);
                let g = ctx.graph(&[y]).unwrap();
                ctx.alloc_graph(&g).unwrap();
                ctx.set_f32(x, &xv).unwrap();
                backend.compute(&g).unwrap();
                ctx.get_f32(y).unwrap()
            };
            let deq = ty.dequantize(&raw, k * m).unwrap();
            let exact = matmul_ref(&deq, &xv, k, m, n);
            let (plain, packed) = (run(false), run(true));
            eprintln!(
                "{} {k}x{m}x{n}: plain vs f32 {:.2e}, packed vs f32 {:.2e}, packed vs plain {:.2e}",
                ty.name(),
                rel_rms(&plain, &exact),
                rel_rms(&packed, &exact),
                rel_rms(&packed, &plain)
            );
            assert!(rel_rms(&packed, &plain) < 1e-3);
        }
    }
}

#[test]
fn a_convolution_too_large_for_its_context_is_an_error_not_an_abort() {
    // Banding at one row per band needs far more tensor objects than 16 fit.
    let ctx = Context::new(16).unwrap();
    ctx.set_conv_budget(1);
    let x = ctx.tensor(Type::F32, &[8, 32, 4, 1], "x").unwrap();
    let k = ctx.tensor(Type::F32, &[4 * 9, 4], "k").unwrap();
    let e = ctx
        .conv2d(x, k, ConvShape::square(3, 1, 1), None)
        .err()
        .expect("no room: an error");
    assert!(e.to_string().contains("too large"), "{e}");
}

/// ggml multiplies an f16 kernel in f16, rounding its input to f16 first: activations
/// past 65504 overflow (SDXL's VAE decoder has them). Cast to f32 in the graph, the
/// same kernel gives the exact product.
#[test]
fn f16_kernels_overflow_on_large_activations_unless_cast_to_f32() {
    let (ic, h, w, oc) = (4, 6, 6, 3);
    let x: Vec<f32> = (0..ic * h * w)
        .map(|i| (((i * 31 % 97) as f32 / 48.0) - 1.0) * 2.0e5)
        .collect();
    let k: Vec<f32> = (0..oc * ic * 9)
        .map(|i| ((i * 17 % 53) as f32 / 26.0) - 1.0)
        .collect();
    let (want, _, _) = conv_ref(&x, [1, ic, h, w], &k, oc, ConvShape::square(3, 1, 1));
    for cast in [false, true] {
        let ctx = Context::new(64).unwrap();
        let xin = ctx.tensor(Type::F32, &[w, h, ic, 1], "x").unwrap();
        let kin = ctx.tensor(Type::F16, &[ic * 9, oc], "k").unwrap();
        ctx.set_input(xin);
        ctx.set_input(kin);
        let kernel = if cast {
            ctx.cast(kin, Type::F32).unwrap()
        } else {
            kin
        };
        let y = ctx
            .conv2d(xin, kernel, ConvShape::square(3, 1, 1), None)
            .unwrap();
        let g = ctx.graph(&[y]).unwrap();
        ctx.alloc_graph(&g).unwrap();
        ctx.set_f32(xin, &x).unwrap();
        let mut kb = Vec::new();
        Type::F16.quantize_rows(&k, oc, ic * 9, &mut kb).unwrap();
        ctx.set_bytes(kin, &kb).unwrap();
        Backend::cpu(2).unwrap().compute(&g).unwrap();
        let got = ctx.get_f32(y).unwrap();
        if cast {
            let e = rel_rms(&want, &got);
            assert!(e < 1e-3, "cast kernel: relative error {e}");
        } else {
            assert!(
                got.iter().any(|v| !v.is_finite()),
                "the plain f16 product was expected to overflow"
            );
        }
    }
}

#[test]
fn transpose_inner_swaps_the_two_inner_axes_of_any_shape() {
    // Sizes off the kernel's 16x64 blocks, a batch axis, and a permuted (non-contiguous)
    // input that takes the copy path.
    for (a, b, n) in [(1, 1, 1), (17, 65, 2), (320, 4096 / 64, 1), (3, 200, 3)] {
        let x: Vec<f32> = (0..a * b * n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let want: Vec<f32> = (0..n)
            .flat_map(|k| (0..a).flat_map(move |i| (0..b).map(move |j| (k, i, j))))
            .map(|(k, i, j)| x[(k * b + j) * a + i])
            .collect();
        for permuted in [false, true] {
            let ctx = Context::new(64).unwrap();
            let xin = if permuted {
                ctx.tensor(Type::F32, &[b, a, n], "x").unwrap()
            } else {
                ctx.tensor(Type::F32, &[a, b, n], "x").unwrap()
            };
            ctx.set_input(xin);
            let src = if permuted {
                ctx.permute(xin, [1, 0, 2, 3]).unwrap()
            } else {
                xin
            };
            let y = ctx.transpose_inner(src).unwrap();
            assert_eq!(y.ne(), [b, a, n, 1]);
            let g = ctx.graph(&[y]).unwrap();
            ctx.alloc_graph(&g).unwrap();
            // The permuted input holds x's transpose, so that its view is x again.
            let data: Vec<f32> = if permuted { want.clone() } else { x.clone() };
            ctx.set_f32(xin, &data).unwrap();
            Backend::cpu(2).unwrap().compute(&g).unwrap();
            assert_eq!(
                ctx.get_f32(y).unwrap(),
                want,
                "{a}x{b}x{n}, permuted {permuted}"
            );
        }
    }
}
