//! The machine's f32 peak, measured with a tight fused-multiply-add loop on every
//! thread, so benchmarks can state achieved FLOP/s as a fraction of the physical limit.
//! It lives here because it needs `std::arch` (unsafe), and this module is where all
//! unsafe code of the crate is kept.
use std::time::Instant;

/// Independent accumulators: enough to hide FMA latency (4 cycles) on two pipes.
const ACC: usize = 12;

/// Best f32 FLOP/s over a few runs of about `seconds` each, on `threads` threads,
/// using the widest FMA this CPU has (AVX-512, AVX2+FMA, NEON, or scalar).
pub fn fma_peak_flops(threads: usize, seconds: f64) -> (f64, &'static str) {
    let (kernel, lanes, name) = pick();
    let threads = threads.max(1);
    // Calibrate iterations on one thread.
    let mut iters = 1usize << 16;
    loop {
        let t = Instant::now();
        std::hint::black_box(kernel(iters));
        let dt = t.elapsed().as_secs_f64();
        if dt > 0.02 || iters > 1 << 34 {
            iters = ((iters as f64) * (seconds / dt.max(1e-9))).max(1.0) as usize;
            break;
        }
        iters *= 4;
    }
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(kernel(iters)));
            }
        });
        let flops = (iters * ACC * lanes * 2 * threads) as f64 / t.elapsed().as_secs_f64();
        best = best.max(flops);
    }
    (best, name)
}

type Kernel = fn(usize) -> f32;

fn pick() -> (Kernel, usize, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return (x86::fma512, 16, "avx512f");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return (x86::fma256, 8, "avx2+fma");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return (arm::fma128, 4, "neon");
    }
    #[allow(unreachable_code)]
    (scalar, 1, "scalar")
}

fn scalar(n: usize) -> f32 {
    let mut acc = [0.0f32; ACC];
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ACC;
    use std::arch::x86_64::*;

    pub fn fma512(n: usize) -> f32 {
        // SAFETY: chosen only after `is_x86_feature_detected!("avx512f")`.
        unsafe { fma512_impl(n) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fma512_impl(n: usize) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_setzero_ps(); ACC];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    pub fn fma256(n: usize) -> f32 {
        // SAFETY: chosen only after detecting avx2 and fma.
        unsafe { fma256_impl(n) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma256_impl(n: usize) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_setzero_ps(); ACC];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        let mut s = 0.0;
        for x in acc {
            _mm256_storeu_ps(out.as_mut_ptr(), x);
            s += out.iter().sum::<f32>();
        }
        s
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::ACC;
    use std::arch::aarch64::*;

    pub fn fma128(n: usize) -> f32 {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe {
            let (a, b) = (vdupq_n_f32(0.999_999), vdupq_n_f32(1e-7));
            let mut acc = [vdupq_n_f32(0.0); ACC];
            for _ in 0..n {
                for x in acc.iter_mut() {
                    *x = vfmaq_f32(b, *x, a);
                }
            }
            acc.iter().map(|&x| vaddvq_f32(x)).sum()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fma_peak_is_positive_and_finite() {
        let (f, name) = super::fma_peak_flops(1, 0.01);
        assert!(f.is_finite() && f > 1e8, "{name}: {f}");
    }
}
