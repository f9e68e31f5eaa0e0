//! Quantization throughput (single thread) for two SD 1.5 weight shapes: a 3x3
//! convolution kernel (320 x 320·3·3, stored as the 2-D matrix the converter writes)
//! and the deepest feed-forward down-projection (1280 x 5120, whose rows also fit
//! the 256-element K-quant blocks). Reported as MB/s of f32 input.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sdrs::ggml::Type;

fn bench_shape(c: &mut Criterion, group: &str, rows: usize, row_len: usize, types: &[Type]) {
    let src: Vec<f32> = (0..rows * row_len)
        .map(|i| ((i * 2654435761usize) % 10007) as f32 / 5003.5 - 1.0)
        .collect();
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes((src.len() * 4) as u64));
    for &t in types {
        g.bench_with_input(BenchmarkId::from_parameter(t.name()), &t, |b, &t| {
            let mut out = Vec::with_capacity(src.len() * 4);
            b.iter(|| {
                out.clear();
                t.quantize_rows(&src, rows, row_len, &mut out)
                    .expect("rows fit the type's blocks");
            })
        });
    }
    g.finish();
}

fn quantize(c: &mut Criterion) {
    bench_shape(
        c,
        "quantize_conv3x3_320",
        320,
        2880,
        &[Type::F16, Type::BF16, Type::Q8_0, Type::Q5_0, Type::Q4_0],
    );
    bench_shape(
        c,
        "quantize_ff_1280x5120",
        1280,
        5120,
        &[Type::Q8_0, Type::Q4_0, Type::Q4_K, Type::Q5_K, Type::Q6_K],
    );
}

criterion_group!(benches, quantize);
criterion_main!(benches);
