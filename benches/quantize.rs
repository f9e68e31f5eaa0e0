//! Quantization throughput for an SD 1.5 3x3 convolution kernel (320 x 320·3·3),
//! stored as the 2-D matrix the converter writes. Reported as input MB/s (f32).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sdrs::ggml::Type;

fn quantize(c: &mut Criterion) {
    let (rows, row_len) = (320, 2880);
    let src: Vec<f32> = (0..rows * row_len).map(|i| ((i * 2654435761usize) % 10007) as f32 / 5003.5 - 1.0).collect();
    let mut g = c.benchmark_group("quantize_conv3x3_320");
    g.throughput(Throughput::Bytes((src.len() * 4) as u64));
    for t in [Type::F16, Type::BF16, Type::Q8_0, Type::Q5_0, Type::Q4_0, Type::Q4_K, Type::Q6_K] {
        g.bench_with_input(BenchmarkId::from_parameter(t.name()), &t, |b, &t| {
            let mut out = Vec::with_capacity(src.len() * 4);
            b.iter(|| {
                out.clear();
                t.quantize_rows(&src, rows, row_len, &mut out).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, quantize);
criterion_main!(benches);
