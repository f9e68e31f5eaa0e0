//! A seeded Brownian path W(σ) for the SDE samplers. Their steps ask for increments
//! over intervals that overlap (DPM++ SDE's two stages both start at σ_i), so the
//! noise must come from one path, not from independent draws. Points are sampled on
//! demand: beyond the known range as a free increment, between two known points from
//! the Brownian bridge (Lévy's construction), so any query order gives a path with
//! the right law and the same seed gives the same path.
use super::{NoiseSampler, Rng};

pub struct BrownianNoise<R: Rng> {
    rng: R,
    /// Known points (σ, W(σ)), sorted by σ.
    points: Vec<(f64, Vec<f64>)>,
}

impl<R: Rng> BrownianNoise<R> {
    pub fn new(rng: R) -> Self {
        BrownianNoise {
            rng,
            points: Vec::new(),
        }
    }

    fn draw(&mut self, n: usize) -> Vec<f64> {
        self.rng.randn(n).into_iter().map(|v| v as f64).collect()
    }

    /// W(t), sampling it (and keeping it) if unknown.
    fn at(&mut self, t: f64, n: usize) -> Vec<f64> {
        if self.points.is_empty() {
            self.points.push((0.0, vec![0.0; n]));
        }
        let pos = self.points.partition_point(|p| p.0 < t);
        if let Some(p) = self.points.get(pos).filter(|p| p.0 == t) {
            return p.1.clone();
        }
        let z = self.draw(n);
        let w: Vec<f64> = match (
            pos.checked_sub(1).map(|i| &self.points[i]),
            self.points.get(pos),
        ) {
            (Some((t0, w0)), Some((t1, w1))) => {
                // Bridge between (t0, w0) and (t1, w1).
                let f = (t - t0) / (t1 - t0);
                let sd = ((t - t0) * (t1 - t) / (t1 - t0)).sqrt();
                w0.iter()
                    .zip(w1)
                    .zip(&z)
                    .map(|((a, b), z)| a + f * (b - a) + sd * z)
                    .collect()
            }
            (Some((t0, w0)), None) => w0
                .iter()
                .zip(&z)
                .map(|(a, z)| a + (t - t0).sqrt() * z)
                .collect(),
            (None, Some((t1, w1))) => w1
                .iter()
                .zip(&z)
                .map(|(a, z)| a + (t1 - t).sqrt() * z)
                .collect(),
            (None, None) => z,
        };
        self.points.insert(pos, (t, w.clone()));
        w
    }
}

impl<R: Rng> NoiseSampler for BrownianNoise<R> {
    /// (W(σ_next) − W(σ)) / sqrt(|σ_next − σ|): unit Gaussian, as k-diffusion's
    /// Brownian-tree noise sampler normalises it.
    fn noise(&mut self, sigma: f64, sigma_next: f64, n: usize) -> Vec<f64> {
        let (a, b) = (self.at(sigma, n), self.at(sigma_next, n));
        let s = (sigma_next - sigma).abs().sqrt().max(1e-300);
        a.iter().zip(&b).map(|(a, b)| (b - a) / s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::NativeRng;

    #[test]
    fn same_seed_same_path_and_overlapping_increments_are_consistent() {
        let mut a = BrownianNoise::new(NativeRng::new(3));
        let mut b = BrownianNoise::new(NativeRng::new(3));
        let n = 4096;
        let x = a.noise(10.0, 5.0, n);
        assert_eq!(x, b.noise(10.0, 5.0, n));
        // W(2.5) − W(10) = (W(5) − W(10)) + (W(2.5) − W(5)).
        let whole = a.noise(10.0, 2.5, n);
        let second = a.noise(5.0, 2.5, n);
        for k in 0..n {
            let lhs = whole[k] * 7.5f64.sqrt();
            let rhs = x[k] * 5f64.sqrt() + second[k] * 2.5f64.sqrt();
            assert!((lhs - rhs).abs() < 1e-9);
        }
        // Increments are unit Gaussian and disjoint ones uncorrelated.
        let mean = second.iter().sum::<f64>() / n as f64;
        let var = second.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let corr = x.iter().zip(&second).map(|(a, b)| a * b).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.06 && (var - 1.0).abs() < 0.08 && corr.abs() < 0.06,
            "{mean} {var} {corr}"
        );
    }
}
