//! PyTorch's CUDA `torch.randn` (float32) computed on the CPU: the noise of A1111's
//! "RNG source: GPU" (modules/rng_philox.py) and stable-diffusion.cpp's `--rng cuda`
//! (rng_philox.hpp), so that a seed gives the initial latent of a torch run on an NVIDIA GPU.
//!
//! How torch draws it (ATen's `distribution_nullary_kernel`,
//! aten/src/ATen/native/cuda/DistributionTemplates.h, over cuRAND's device API,
//! curand_kernel.h and curand_normal.h):
//!
//! * The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
//!   as 1, 2, 3", SC'11), keyed by the whole 64-bit seed, low word first.
//! * The kernel runs T threads, 256 per block, the grid capped at the blocks the GPU
//!   keeps resident. Thread t calls `curand_init(seed, t, offset)`, so its j-th Philox
//!   block has the counter (offset / 4 + j, t): two 64-bit halves, low words first.
//! * `curand_normal4` turns one block (x, y, z, w) into r·sin θ, r·cos θ from (x, y) and
//!   the same from (z, w), in float32: u = x·2⁻³² + 2⁻³³, θ = (y + ½)·2π·2⁻³²,
//!   r = √(−2 ln u).
//! * Element i is output (i / T) mod 4 of block i / 4T of thread i mod T. While n ≤ T
//!   (a 512² SD latent of 16 384 values fits on any recent GPU) that is r·sin θ of thread
//!   i's first block: all that A1111 and stable-diffusion.cpp model, and what
//!   [`CudaRng::new`] does. [`CudaRng::for_gpu`] follows one GPU's grid for any n.
//! * A call advances torch's offset by 4 per block a thread used, so the counter by
//!   ⌈n / 4T⌉: by 1 when n ≤ 4T, and not at all when n = 0.
//!
//! Philox and the element layout are exact. The float32 steps round as cuRAND's device
//! code compiled by nvcc does (u32 → f32, a fused multiply-add for θ, sqrtf), with ln,
//! sin and cos correctly rounded. The GPU takes sin and cos from its approximate
//! `__sincosf`, which no CPU formula reproduces, so values agree with the GPU's to a few
//! 1e-7, not bit for bit. That error hides how A1111 (float64 from the exact integers) or
//! stable-diffusion.cpp (float32, no FMA) round, except near 0: with u close to 1 the GPU's
//! float32 u decides the value, and A1111's float64 u moves it by up to 1e-5.

use super::rng::Rng;

/// Philox4x32 round multipliers and key increments (Salmon et al. 2011; Random123).
const PHILOX_M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const PHILOX_W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

/// cuRAND's `CURAND_2POW32_INV` (2⁻³² exactly) and `CURAND_2POW32_INV_2PI`, whose C
/// definitions `2.3283064e-10f` and `2.3283064e-10f * 6.2831855f` are float32 throughout.
const TWO_POW32_INV: f32 = 2.328_306_4e-10;
const TWO_POW32_INV_2PI: f32 = 2.328_306_4e-10 * 6.283_185_5;

/// Threads per block of torch's distribution kernels (`block_size_bound`).
const BLOCK: usize = 256;

/// `torch.randn(n, device="cuda")` after `torch.manual_seed(seed)`; successive calls
/// continue the stream as successive draws from that torch generator do.
pub struct CudaRng {
    key: [u32; 2],
    /// The first counter word of the next call's blocks: torch's Philox offset over 4.
    offset: u64,
    /// Threads in one full launch on the GPU imitated; `None`: as many as elements.
    max_threads: Option<usize>,
}

impl CudaRng {
    /// torch on a GPU that gives every element its own thread, as A1111 and
    /// stable-diffusion.cpp assume. A real GPU does while n is at most the thread count
    /// of [`CudaRng::for_gpu`] (43 008 on an RTX 3060, 221 184 on an A100).
    pub fn new(seed: u64) -> Self {
        CudaRng {
            key: [seed as u32, (seed >> 32) as u32],
            offset: 0,
            max_threads: None,
        }
    }

    /// torch on a GPU with `sm_count` multiprocessors of `max_threads_per_sm` threads
    /// (CUDA's `multiProcessorCount`, `maxThreadsPerMultiProcessor`), for any n: larger
    /// tensors make each thread draw several elements. An A100 is (108, 2048), an H100
    /// SXM (132, 2048), an RTX 4090 (128, 1536). The grid is at least one block.
    pub fn for_gpu(seed: u64, sm_count: usize, max_threads_per_sm: usize) -> Self {
        let blocks = sm_count.saturating_mul(max_threads_per_sm / BLOCK).max(1);
        CudaRng {
            max_threads: Some(blocks.saturating_mul(BLOCK)),
            ..CudaRng::new(seed)
        }
    }

    /// The threads torch launches for n ≥ 1 elements: whole blocks, at most the GPU's.
    fn threads(&self, n: usize) -> usize {
        let wanted = n.div_ceil(BLOCK).saturating_mul(BLOCK);
        self.max_threads.map_or(wanted, |max| wanted.min(max))
    }

    /// Element i of the next `randn(n)`, without drawing it (n ≥ 1, i < n).
    fn element(&self, n: usize, i: usize) -> f32 {
        let threads = self.threads(n);
        let (wave, thread) = (i / threads, (i % threads) as u64);
        let counter = self.offset.wrapping_add((wave / 4) as u64);
        let block = philox4x32_10(
            [
                counter as u32,
                (counter >> 32) as u32,
                thread as u32,
                (thread >> 32) as u32,
            ],
            self.key,
        );
        let (x, y) = if wave % 4 < 2 {
            (block[0], block[1])
        } else {
            (block[2], block[3])
        };
        box_muller(x, y, wave % 2 == 1)
    }
}

impl Rng for CudaRng {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        // torch returns before touching the generator for an empty tensor.
        if n == 0 {
            return Vec::new();
        }
        let out = (0..n).map(|i| self.element(n, i)).collect();
        let blocks_per_thread = n.div_ceil(self.threads(n).saturating_mul(4));
        self.offset = self.offset.wrapping_add(blocks_per_thread as u64);
        out
    }
}

/// The Philox4x32-10 bijection: ten rounds of two 32×32→64-bit products, the key
/// bumped by the Weyl increments between rounds.
fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W[0]);
            key[1] = key[1].wrapping_add(PHILOX_W[1]);
        }
        let p0 = u64::from(PHILOX_M[0]) * u64::from(ctr[0]);
        let p1 = u64::from(PHILOX_M[1]) * u64::from(ctr[2]);
        ctr = [
            (p1 >> 32) as u32 ^ ctr[1] ^ key[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ ctr[3] ^ key[1],
            p0 as u32,
        ];
    }
    ctr
}

/// cuRAND's `_curand_box_muller` (device branch) for the words (x, y): r·sin θ, or
/// r·cos θ with `cos`.
fn box_muller(x: u32, y: u32, cos: bool) -> f32 {
    // x·2⁻³² is exact, so the FMA nvcc makes of this rounds no differently.
    let u = x as f32 * TWO_POW32_INV + TWO_POW32_INV / 2.0;
    // Here the product is inexact and the FMA's single rounding matters.
    let theta = f64::from((y as f32).mul_add(TWO_POW32_INV_2PI, TWO_POW32_INV_2PI / 2.0));
    // −2·ln u is exact once ln u is rounded; u ≥ 2⁻³³, and u = 1 gives r = 0.
    let r = (-2.0 * (f64::from(u).ln() as f32)).sqrt();
    let trig = if cos { theta.cos() } else { theta.sin() } as f32;
    // torch stores z·std + mean with std 1, mean 0: the same value, but −0 becomes +0.
    trig * r + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How far our value may sit from the GPU's: the GPU's `__sincosf` is an
    /// approximation (CUDA guide: absolute error 2^-21.41 on [−π, π], more beyond), and
    /// on the 8-digit values below we are off by at most 6.2e-7.
    const GPU_SINE: f32 = 1e-6;
    /// Half a unit of the 4th decimal, for values torch printed with 4 decimals.
    const PRINTED_4: f32 = 5e-5 + GPU_SINE;

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w} (±{tol})"
            );
        }
    }

    /// Elements `idx` of a `randn(n)` drawn from `rng` (without drawing all n).
    fn at(rng: &CudaRng, n: usize, idx: &[usize]) -> Vec<f32> {
        idx.iter().map(|&i| rng.element(n, i)).collect()
    }

    /// Indices of a `[rows, cols]` tensor as torch prints a large one: the first and
    /// last three columns of the first and last three rows.
    fn printed_corners(rows: usize, cols: usize) -> Vec<usize> {
        let row_ids = [0, 1, 2, rows - 3, rows - 2, rows - 1];
        let col_ids = [0, 1, 2, cols - 3, cols - 2, cols - 1];
        row_ids
            .iter()
            .flat_map(|r| col_ids.iter().map(move |c| r * cols + c))
            .collect()
    }

    #[test]
    fn philox_matches_random123_known_answers() {
        // Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key,
        // expected output.
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (ctr, key, want) in kat {
            assert_eq!(philox4x32_10(ctr, key), want);
        }
    }

    /// A1111's modules/rng_philox.py docstring, "Expected output" of
    /// `Generator(seed=0).randn(shape=(3, 4))` (AUTOMATIC1111/stable-diffusion-webui).
    /// That file's own float64 arithmetic misses these 8-digit values by up to 2.6e-7 and
    /// no correctly rounded formula we tried hits them; they agree with the GPU's printed
    /// values below, so they are presumably the GPU's, and pin our distance from it.
    #[test]
    fn seed_0_matches_a1111_docstring_to_gpu_sine_error() {
        let want: [f64; 12] = [
            -0.92466259,
            -0.42534415,
            -2.6438457,
            0.14518388,
            -0.12086647,
            -0.57972564,
            -0.62285122,
            -0.32838709,
            -1.07454231,
            -0.36314407,
            -1.67105067,
            2.26550497,
        ];
        let want = want.map(|w| w as f32);
        assert_close(&CudaRng::new(0).randn(12), &want, GPU_SINE, "seed 0");
    }

    /// The first three draws after `torch.manual_seed(0)` on CUDA, printed with 4
    /// decimals by libtorch in kapilsh/kapilsh.github.io,
    /// _posts/2024-05-30-cuda-mode-fusing-kernels-talk.md (output of
    /// fused_kernels_lora_test: tensors x [8, 10], then bias [10], then y [8, 10]). The
    /// first 64 values of x are also the Python `torch.randn((8, 8), device='cuda')` of
    /// the same post. Pins the offset advance: one counter step per call.
    #[test]
    fn successive_calls_continue_like_torch_seed_0() {
        let x = [
            -0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284, -1.0745,
            -0.3631, -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820, -0.1271, 1.2169, 1.4353,
            1.0605, -0.4941, -1.4244, -0.7244, -1.2973, 0.0697, -0.0074, 1.8969, 0.6878, -0.0779,
            -0.8373, 1.3506, -0.2879, -0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435,
            1.5150, 0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554, -0.1836,
            0.3824, 0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863, -0.5499, -0.3231, -0.5469,
            0.9049, 0.2837, 0.1210, 0.4730, -1.0823, -0.0334, -0.9734, 0.9559, -1.1795, -1.0064,
            0.1160, 0.6852, -0.4124, -0.6738, -0.5404, 0.6898, -1.5517, 0.3805, -0.0436, 0.3597,
            -0.5043,
        ];
        let bias = [
            0.1808, -0.5523, 0.9238, -0.7350, 1.3800, 0.8676, 0.1297, -0.9406, 0.8109, 0.8821,
        ];
        let y = [
            2.5441, -0.7163, -0.4934, 0.1267, 0.1014, -0.4035, 0.9023, 0.8099, -0.6884, 0.1372,
            1.0377, 0.0925, -0.3752, -0.0908, 2.0639, -1.8164, -0.2719, 0.2811, -1.0399, 0.7765,
            0.8814, 0.0444, -1.4870, 1.1334, 1.3268, -1.2616, 0.9501, -0.6558, 0.9098, -0.6290,
            -0.6587, 2.0811, 1.4151, -0.3091, -0.2055, 2.0562, -0.0490, -0.6361, -0.5359, -0.1310,
            -0.2945, 1.2275, 1.0549, 0.3576, 1.6378, -0.2310, 0.7883, -0.0807, -0.3924, 1.2673,
            1.0420, -0.4945, -1.1637, 1.5740, 0.7116, 0.6104, 1.2852, -0.6533, 1.1171, -1.0067,
            1.2912, 1.6028, 0.1332, 1.0703, -1.1161, -0.8396, -3.6680, 0.8189, 0.1255, -0.7691,
            0.1552, -0.8782, -0.4734, 0.9690, -1.9985, 0.1030, 0.8580, 0.7625, -1.2587, -0.8183,
        ];
        let mut rng = CudaRng::new(0);
        assert_close(&rng.randn(80), &x, PRINTED_4, "call 1");
        assert_close(&rng.randn(10), &bias, PRINTED_4, "call 2");
        assert_close(&rng.randn(80), &y, PRINTED_4, "call 3");
    }

    /// kapilsh/cuda-mode-lecture, kernels/triton_fused_add_mul_relu.py (commit 7e512fc):
    /// `torch.manual_seed(0)`, then a = randn(8, 8), b = randn(8, 8), c = randn(1, 8),
    /// all float32 on CUDA, and it prints max(a + 0.5·b + c, 0) (output in the blog post
    /// above). The same offset advance, checked through code whose draws we can read.
    #[test]
    fn three_calls_match_published_fused_relu_of_seed_0() {
        let want: [f32; 64] = [
            1.7098, 0.0, 0.0, 0.0, 6.7049e-1, 0.0, 3.4424e-1, 1.1223e-2, //
            1.8750, 0.0, 0.0, 2.2105, 6.6808e-1, 0.0, 1.8445, 1.9246, //
            2.2614, 1.3964, 5.1802e-1, 2.0114, 0.0, 0.0, 2.7715e-1, 0.0, //
            2.4750, 0.0, 1.9079, 5.4869e-1, 3.7923e-1, 0.0, 3.1791, 6.6843e-1, //
            1.8234, 0.0, 1.1147e-1, 0.0, 0.0, 0.0, 2.4250, 3.2593, //
            2.2903, 0.0, 1.1721, 6.9331e-1, 1.0583, 6.7518e-1, 0.0, 2.6185e-1, //
            1.5804, 0.0, 9.0740e-1, 1.6670e-1, 5.5230e-2, 0.0, 1.5325, 3.5984e-1, //
            1.5554, 0.0, 0.0, 9.4380e-1, 2.9795e-3, 7.4125e-2, 1.6286, 0.0,
        ];
        let mut rng = CudaRng::new(0);
        let (a, b, c) = (rng.randn(64), rng.randn(64), rng.randn(8));
        for (i, w) in want.iter().enumerate() {
            let got = (a[i] + 0.5 * b[i] + c[i % 8]).max(0.0);
            // Five significant digits printed; three values each off by up to GPU_SINE.
            let tol = 5e-5 * w.abs() + 3.0 * GPU_SINE;
            assert!((got - w).abs() <= tol, "[{i}]: got {got}, want {w}");
        }
    }

    /// Tensors no larger than one launch: every GPU gives the same values.
    #[test]
    fn one_wave_tensors_match_published_gpu_values() {
        // pytorch/pytorch#62467: manual_seed(43), empty(1, 3, 128, 128).normal_() on an
        // RTX A6000, elements [..., 0, 0].
        let got = at(
            &CudaRng::new(43),
            3 * 128 * 128,
            &[0, 128 * 128, 2 * 128 * 128],
        );
        assert_close(&got, &[1.9983, 0.8704, 2.1127], PRINTED_4, "seed 43");
        // pytorch/pytorch#143086: manual_seed(1), randn(1, 9483264), the first three
        // values, which the H100 and A100 printed alike.
        let got = at(&CudaRng::new(1), 9_483_264, &[0, 1, 2]);
        assert_close(&got, &[-0.2963, 2.6764, -0.1408], PRINTED_4, "seed 1");
    }

    /// Tensors larger than one launch: later elements come from the cosine and (z, w)
    /// outputs and later blocks of each thread, as the GPU's grid decides.
    #[test]
    fn large_tensors_follow_the_gpus_launch_grid() {
        // pytorch/pytorch#143086: randn(1, 9483264) after manual_seed(1), the last three
        // values on each GPU (outputs sin (z, w) / cos (z, w) of the 11th / 9th block).
        let n = 9_483_264;
        let last = [n - 3, n - 2, n - 1];
        let a100 = at(&CudaRng::for_gpu(1, 108, 2048), n, &last);
        assert_close(&a100, &[0.1549, -0.6797, -0.1656], PRINTED_4, "A100");
        let h100 = at(&CudaRng::for_gpu(1, 132, 2048), n, &last);
        assert_close(&h100, &[-0.6970, -0.7780, 0.3267], PRINTED_4, "H100");

        // pytorch/pytorch#97097, machine 1 (RTX A4000: 48 SMs × 1536 threads):
        // manual_seed(14), FloatTensor(1000, 100).normal_(5, 5 ** .5); rows 997-999 are
        // past the 73 728 threads, so they are cosines.
        let printed = [
            2.8731, 5.2727, 2.9889, 1.6853, 9.6331, 6.6319, //
            3.9968, 3.8097, 5.7328, 4.4029, 3.9804, 7.4698, //
            6.5552, 4.0857, 4.2315, 2.7704, 3.5479, 3.3063, //
            8.6297, 2.3137, 6.2596, 7.9358, 4.4697, 2.7475, //
            7.0551, 7.8583, 3.9990, 4.1139, 8.9315, 4.2042, //
            2.7337, 2.2106, 7.7815, 8.2207, 6.5395, 4.2604,
        ];
        let std = 5f32.sqrt();
        let z = at(
            &CudaRng::for_gpu(14, 48, 1536),
            100_000,
            &printed_corners(1000, 100),
        );
        let got: Vec<f32> = z.iter().map(|z| z.mul_add(std, 5.0)).collect();
        assert_close(&got, &printed, 5e-5 + std * GPU_SINE, "A4000 seed 14");

        // pytorch/pytorch#158398, the first machine: randn([1, 64, 2048]) after
        // manual_seed(42). Rows 61-63 match a grid of 168 blocks (e.g. 28 SMs × 1536
        // threads, an RTX 3060), and no other from 1 to 1024 blocks.
        let printed = [
            0.1940, 2.1614, -0.1721, 1.4540, -2.7733, -0.8932, //
            -0.4574, 0.8063, 0.1580, 0.1124, 0.2769, -1.2535, //
            1.1346, -0.6329, -0.9147, -1.0001, -1.1552, -0.6955, //
            -0.4861, 0.3358, 1.0578, -0.7282, 0.5087, 0.1318, //
            0.7881, 0.8339, -1.1424, -0.6297, -1.1112, -0.4091, //
            -1.2356, -0.4083, -0.4695, -0.4841, 1.2850, -0.0282,
        ];
        let idx = printed_corners(64, 2048);
        let got = at(&CudaRng::for_gpu(42, 28, 1536), 64 * 2048, &idx);
        assert_close(&got, &printed, PRINTED_4, "seed 42 on 168 blocks");
        // Its first rows are within one launch of any GPU.
        let got = at(&CudaRng::new(42), 64 * 2048, &idx[..18]);
        assert_close(&got, &printed[..18], PRINTED_4, "seed 42, rows 0-2");
    }

    #[test]
    fn counter_advances_by_blocks_per_thread() {
        let next = |offset| {
            CudaRng {
                offset,
                ..CudaRng::new(7)
            }
            .randn(5)
        };
        // One wave, however large: one block per thread, as for A1111's offset += 1.
        let mut rng = CudaRng::new(7);
        rng.randn(100_000);
        assert_eq!(rng.randn(5), next(1));
        // 2000 elements on 256 threads: each thread uses ⌈2000 / 1024⌉ = 2 blocks.
        let mut rng = CudaRng::for_gpu(7, 1, 256);
        rng.randn(2000);
        assert_eq!(rng.randn(5), next(2));
        // Exactly 4 per thread still fits one block each.
        let mut rng = CudaRng::for_gpu(7, 1, 256);
        rng.randn(1024);
        assert_eq!(rng.randn(5), next(1));
    }

    #[test]
    fn empty_draw_returns_nothing_and_leaves_the_stream() {
        let mut rng = CudaRng::new(3);
        assert!(rng.randn(0).is_empty());
        assert_eq!(rng.randn(6), CudaRng::new(3).randn(6));
    }

    /// torch keys Philox with all 64 bits of the seed (the CPU generator, by contrast,
    /// keeps only the low 32).
    #[test]
    fn seed_upper_32_bits_change_the_stream() {
        let low = CudaRng::new(5).randn(16);
        let high = CudaRng::new((1 << 32) | 5).randn(16);
        assert!(low.iter().zip(&high).all(|(a, b)| a != b));
        assert_eq!(CudaRng::new((1 << 32) | 5).key, [5, 1]);
    }

    #[test]
    fn output_is_deterministic() {
        let draw = |seed| {
            let mut rng = CudaRng::new(seed);
            [rng.randn(1000), rng.randn(3), rng.randn(257)].concat()
        };
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(draw(1234)), bits(draw(1234)));
        assert_ne!(bits(draw(1234)), bits(draw(1235)));
    }

    #[test]
    fn values_within_one_wave_do_not_depend_on_n() {
        let long = CudaRng::new(9).randn(4096);
        assert_eq!(CudaRng::new(9).randn(100), long[..100]);
        // A GPU grid large enough for all n gives the one-thread-per-element values.
        assert_eq!(CudaRng::for_gpu(9, 108, 2048).randn(4096), long);
    }

    #[test]
    fn degenerate_gpu_shape_still_draws() {
        let mut rng = CudaRng::for_gpu(1, 0, 0);
        assert_eq!(rng.threads(10_000), BLOCK);
        assert_eq!(rng.randn(3000).len(), 3000);
    }

    #[test]
    fn u_of_one_gives_positive_zero() {
        // x ≥ 2³² − 128 rounds to 2³² as f32, so u = 1 and r = √(−2·0) = −0: a positive
        // sine (θ ≈ π/2) or cosine (θ ≈ 0) gives −0, which torch's `+ mean` makes +0.
        assert_eq!(box_muller(u32::MAX, 1 << 30, false).to_bits(), 0);
        assert_eq!(box_muller(u32::MAX, 0, true).to_bits(), 0);
        assert_eq!(box_muller(u32::MAX, 3 << 30, false).to_bits(), 0);
    }
}
