//! The hot kernels of a SD 1.5 512x512 CFG step (batch 2) on ggml's CPU backend, as
//! GFLOP/s (criterion's "elem/s" here counts floating-point operations, 2·M·N·K per
//! product): a 3x3 convolution and a projection GEMM per weight type, and
//! self-attention at 4096 and 1024 tokens (head size 40: SD 1.5's first level) with
//! each kernel, with and without padding the head size to 16; and a whole TAESD-family
//! decode at 512x512 (the real TAEF2 decoder from `../shared/models`: TAESD's network
//! with a 16-channel first layer, so it times SD's TAESD within a percent) and its
//! 64-channel 3x3 convolution at 512x512 by im2col and by Winograd; and the
//! transpose around every convolution, in bytes per second.
//!
//! `SDRS_BENCH_THREADS` sets the thread count (default: all cores).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sdrs::ggml::{Backend, Context, ConvShape, Tensor, Type};
use sdrs::model::nn::{attend, Attention};

fn threads() -> usize {
    std::env::var("SDRS_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Deterministic values in [-1, 1).
fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + salt) * 2654435761usize) % 10007) as f32 / 5003.5 - 1.0)
        .collect()
}

fn set(ctx: &Context<'_>, t: Tensor<'_>, salt: usize) {
    let n = t.nelements();
    let v = values(n, salt);
    if t.ty() == Type::F32 {
        ctx.set_f32(t, &v).expect("f32 tensor");
    } else {
        let row = t.ne()[0];
        let mut bytes = Vec::new();
        t.ty()
            .quantize_rows(&v, n / row, row, &mut bytes)
            .expect("rows fit the type");
        ctx.set_bytes(t, &bytes).expect("sizes agree");
    }
}

/// Builds a graph with `build` (its output and its inputs), fills the inputs and
/// measures one evaluation.
fn bench_graph(
    c: &mut Criterion,
    group: &str,
    id: &str,
    flops: f64,
    backend: &Backend,
    build: impl for<'c> Fn(&'c Context<'c>) -> sdrs::Result<(Tensor<'c>, Vec<Tensor<'c>>)>,
) {
    let ctx = Context::new(64).expect("context");
    let (out, inputs) = build(&ctx).expect("graph");
    let graph = ctx.graph(&[out]).expect("graph");
    ctx.alloc_graph(&graph).expect("compute buffer");
    for (i, t) in inputs.into_iter().enumerate() {
        set(&ctx, t, 10 + i);
    }
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(flops as u64));
    g.sample_size(10);
    g.bench_function(BenchmarkId::from_parameter(id), |b| {
        b.iter(|| backend.compute(&graph).expect("compute"))
    });
    g.finish();
}

/// Weights live in a context of their own, allocated once (a graph allocator only
/// places intermediates and inputs).
fn conv3x3(c: &mut Criterion, backend: &Backend) {
    let (w, h, ch, n) = (64, 64, 320, 2);
    let flops = 2.0 * (ch * 9 * ch * w * h * n) as f64;
    for ty in [Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0] {
        let wctx = Context::new(4).expect("context");
        let kernel = wctx.tensor(ty, &[ch * 9, ch], "kernel").expect("kernel");
        wctx.alloc_cpu(backend).expect("alloc");
        set(&wctx, kernel, 1);
        let ctx = Context::new(64).expect("context");
        let x = ctx.tensor(Type::F32, &[w, h, ch, n], "x").expect("x");
        ctx.set_input(x);
        let y = ctx
            .conv2d(x, kernel, ConvShape::square(3, 1, 1), None)
            .expect("conv");
        ctx.set_output(y);
        let graph = ctx.graph(&[y]).expect("graph");
        ctx.alloc_graph(&graph).expect("compute buffer");
        set(&ctx, x, 2);
        let mut g = c.benchmark_group("conv3x3_320_64x64_b2");
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10);
        g.bench_function(BenchmarkId::from_parameter(ty.name()), |b| {
            b.iter(|| backend.compute(&graph).expect("compute"))
        });
        g.finish();
    }
}

/// A 3x3 convolution (TAESD's 64 channels at 512x512; the SD VAE's 256 at 256x256), by
/// im2col and ggml's product
/// (f16 and f32 kernels) and by sdrs' Winograd F(4x4, 3x3) op (GFLOP/s counted as the
/// direct convolution's, so the rates compare as speed).
fn conv3x3_taesd(c: &mut Criterion, backend: &Backend) {
    // TAESD's layer, and SD's VAE decoder's at its 256² level.
    for (ch, side) in [(64, 512), (256, 256)] {
        conv3x3_at(c, backend, ch, side);
    }
}

fn conv3x3_at(c: &mut Criterion, backend: &Backend, ch: usize, side: usize) {
    let (w, h) = (side, side);
    let flops = 2.0 * (ch * 9 * ch * w * h) as f64;
    for id in ["f32", "f16", "winograd"] {
        let wctx = Context::new(4).expect("context");
        let kernel = match id {
            "winograd" => wctx.tensor(Type::F32, &[ch, ch, sdrs::ggml::WINOGRAD_POSITIONS], "u"),
            "f16" => wctx.tensor(Type::F16, &[ch * 9, ch], "kernel"),
            _ => wctx.tensor(Type::F32, &[ch * 9, ch], "kernel"),
        }
        .expect("kernel");
        wctx.alloc_cpu(backend).expect("alloc");
        set(&wctx, kernel, 1);
        let ctx = Context::new(1024).expect("context");
        let x = ctx.tensor(Type::F32, &[w, h, ch, 1], "x").expect("x");
        ctx.set_input(x);
        let y = if id == "winograd" {
            ctx.conv3x3_winograd(x, kernel, 1, None)
        } else {
            ctx.conv2d(x, kernel, ConvShape::square(3, 1, 1), None)
        }
        .expect("conv");
        ctx.set_output(y);
        let graph = ctx.graph(&[y]).expect("graph");
        ctx.alloc_graph(&graph).expect("compute buffer");
        set(&ctx, x, 2);
        let mut g = c.benchmark_group(format!("conv3x3_{ch}_{side}x{side}"));
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10);
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| backend.compute(&graph).expect("compute"))
        });
        g.finish();
    }
}

fn gemm(c: &mut Criterion, backend: &Backend) {
    // SD 1.5's q/k/v/out projections at the first level: 320 x 320 over 8192 tokens.
    let (m, k, n) = (320, 320, 8192);
    for ty in [Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0] {
        let wctx = Context::new(4).expect("context");
        let wt = wctx.tensor(ty, &[k, m], "w").expect("w");
        wctx.alloc_cpu(backend).expect("alloc");
        set(&wctx, wt, 3);
        let ctx = Context::new(16).expect("context");
        let x = ctx.tensor(Type::F32, &[k, n], "x").expect("x");
        ctx.set_input(x);
        let y = ctx.mul_mat(wt, x).expect("mul_mat");
        ctx.set_output(y);
        let graph = ctx.graph(&[y]).expect("graph");
        ctx.alloc_graph(&graph).expect("compute buffer");
        set(&ctx, x, 4);
        let mut g = c.benchmark_group("gemm_320x320x8192");
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        g.sample_size(10);
        g.bench_function(BenchmarkId::from_parameter(ty.name()), |b| {
            b.iter(|| backend.compute(&graph).expect("compute"))
        });
        g.finish();
    }
}

fn attention(c: &mut Criterion, backend: &Backend) {
    // (queries, keys, head size) of SD 1.5 at 512x512: first-level self-attention,
    // its cross-attention over 77 text tokens, second-level self-attention; and the
    // first level at 256x256.
    let (heads, batch) = (8, 2);
    for (nq, nk, d) in [
        (4096, 4096, 40),
        (4096, 77, 40),
        (1024, 1024, 80),
        (1024, 1024, 40),
    ] {
        let flops = 4.0 * (nq * nk * d * heads * batch) as f64;
        for (kind, id, align) in [
            (Attention::MatMul, "matmul", 1),
            (Attention::MatMul, "matmul_pad16", 16),
            (Attention::Flash, "flash", 1),
            (Attention::Tiled, "tiled", 1),
        ] {
            if align > 1 && d % align == 0 {
                continue;
            }
            bench_graph(
                c,
                &format!("attention_q{nq}_k{nk}_d{d}_h8_b2"),
                id,
                flops,
                backend,
                |ctx| {
                    // Projections come out as [D*H, N, B]; heads are split by a view.
                    let (mut qkv, mut inputs) = (Vec::new(), Vec::new());
                    for (name, n) in [("q", nq), ("k", nk), ("v", nk)] {
                        let t = ctx.tensor(Type::F32, &[d * heads, n, batch], name)?;
                        ctx.set_input(t);
                        inputs.push(t);
                        let t = ctx.reshape(t, &[d, heads, n, batch])?;
                        qkv.push(ctx.permute(t, [0, 2, 1, 3])?); // [D, N, H, B]
                    }
                    let o = attend(ctx, qkv[0], qkv[1], qkv[2], false, kind, align)?;
                    ctx.set_output(o);
                    Ok((o, inputs))
                },
            );
        }
    }
}

fn taesd_decode(c: &mut Criterion, backend: &Backend) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models/taef2/taef2_decoder.pth");
    let Ok(ck) = sdrs::formats::Checkpoint::open(&path) else {
        eprintln!("skipping taesd_decode: {} not found", path.display());
        return;
    };
    let w = sdrs::model::Weights::from_checkpoint_half(&ck, backend).expect("TAEF2 weights");
    let channels = sdrs::model::taesd::latent_channels(&w).expect("decoder");
    let latent = values(channels * 64 * 64, 5);
    let mut g = c.benchmark_group("taesd_decode_512x512");
    g.sample_size(10);
    g.bench_function("taef2", |b| {
        b.iter(|| {
            sdrs::model::taesd::decode(&w, sdrs::model::Planes::single(&latent, 64, 64), backend)
                .expect("decode")
        })
    });
    g.finish();
}

/// The layout change around every convolution, at the SD VAE decoder's 256² level:
/// 256 channels of 256x256 pixels from `[C, pixels]` (the product's rows) to
/// `[pixels, C]` (channel planes), in bytes read and written per second, by sdrs'
/// blocked transpose (the convolution epilogue without bias) and by ggml's permuted
/// copy (what each convolution paid before it).
fn transpose(c: &mut Criterion, backend: &Backend) {
    let (ch, pixels) = (256, 256 * 256);
    let mut g = c.benchmark_group("transpose_256ch_256x256");
    g.throughput(Throughput::Bytes((2 * 4 * ch * pixels) as u64));
    g.sample_size(10);
    for kind in ["sdrs", "ggml"] {
        let ctx = Context::new(16).expect("context");
        let x = ctx.tensor(Type::F32, &[ch, pixels, 1], "x").expect("x");
        ctx.set_input(x);
        let y = match kind {
            "sdrs" => ctx.transpose_inner(x),
            _ => ctx.permute(x, [1, 0, 2, 3]).and_then(|p| ctx.cont(p)),
        }
        .expect("transpose");
        ctx.set_output(y);
        let graph = ctx.graph(&[y]).expect("graph");
        ctx.alloc_graph(&graph).expect("compute buffer");
        set(&ctx, x, 4);
        g.bench_function(BenchmarkId::from_parameter(kind), |b| {
            b.iter(|| backend.compute(&graph).expect("compute"))
        });
    }
    g.finish();
}

fn kernels(c: &mut Criterion) {
    let backend = Backend::cpu(threads()).expect("CPU backend");
    conv3x3_taesd(c, &backend);
    transpose(c, &backend);
    taesd_decode(c, &backend);
    attention(c, &backend);
    conv3x3(c, &backend);
    gemm(c, &backend);
}

criterion_group!(benches, kernels);
criterion_main!(benches);
