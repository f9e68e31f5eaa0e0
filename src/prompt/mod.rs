//! Prompts as the text encoders take them: A1111's emphasis syntax ([`parse`]),
//! 77-token windows for prompts of any length ([`chunks`]), textual-inversion
//! embeddings ([`embedding`]), and the weights applied to the encodings.
pub mod chunks;
pub mod embedding;
pub mod parse;
pub mod tags;

pub use chunks::{Chunk, Fix, Trigger, Windows};
pub use embedding::{Embedding, Embeddings};
pub use parse::{parse, Piece};
pub use tags::{take_loras, LoraTag};

use crate::error::{Error, Result};

/// What prompt weights do (A1111's "Emphasis" setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Emphasis {
    /// Each token's encoding is multiplied by its weight, then the whole window is
    /// scaled back to its unweighted mean (A1111's default).
    #[default]
    Original,
    /// Multiplied by the weights, no rescale.
    NoNorm,
    /// No syntax at all: brackets and `BREAK` are plain text.
    None,
}

impl Emphasis {
    pub const NAMES: &'static [&'static str] = &["original", "no-norm", "none"];

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "original" => Some(Emphasis::Original),
            "no-norm" | "no_norm" | "nonorm" => Some(Emphasis::NoNorm),
            "none" => Some(Emphasis::None),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Emphasis::Original => "Original",
            Emphasis::NoNorm => "No norm",
            Emphasis::None => "None",
        }
    }

    /// The pieces of `prompt` under this setting.
    pub fn pieces(self, prompt: &str) -> Result<Vec<Piece>> {
        match self {
            Emphasis::None => Ok(vec![Piece {
                text: prompt.to_string(),
                weight: 1.0,
            }]),
            _ => parse(prompt),
        }
    }

    /// Applies a window's token weights to its encoding `z` (`[tokens][width]`).
    pub fn apply(self, z: &mut [f32], weights: &[f32]) -> Result<()> {
        if weights.is_empty() || !z.len().is_multiple_of(weights.len()) {
            return Err(Error::Invalid(format!(
                "{} weights for an encoding of {} values",
                weights.len(),
                z.len()
            )));
        }
        if self == Emphasis::None || weights.iter().all(|&w| w == 1.0) {
            return Ok(());
        }
        let width = z.len() / weights.len();
        let mean = |z: &[f32]| z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
        let before = mean(z);
        for (row, &w) in z.chunks_mut(width).zip(weights) {
            row.iter_mut().for_each(|v| *v *= w);
        }
        if self == Emphasis::Original {
            let after = mean(z);
            // A window whose weighted mean is exactly zero is left as it is (A1111
            // would divide by zero and fill it with inf/NaN).
            if after != 0.0 {
                let k = (before / after) as f32;
                z.iter_mut().for_each(|v| *v *= k);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_emphasis_restores_the_window_mean_and_no_norm_does_not() {
        let z0: Vec<f32> = (0..12).map(|i| 0.5 + i as f32 * 0.25).collect();
        let w = [1.0, 1.5, 0.5];
        let mean = |z: &[f32]| z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
        let mut z = z0.clone();
        Emphasis::Original.apply(&mut z, &w).unwrap();
        assert!((mean(&z) - mean(&z0)).abs() < 1e-6);
        let mut n = z0.clone();
        Emphasis::NoNorm.apply(&mut n, &w).unwrap();
        assert_eq!(n[4], z0[4] * 1.5);
        // The ratio between tokens is the weights' ratio either way.
        assert!((z[4] / z[0] - n[4] / n[0]).abs() < 1e-5);
        let mut u = z0.clone();
        Emphasis::Original.apply(&mut u, &[1.0; 3]).unwrap();
        assert_eq!(u, z0);
        assert!(Emphasis::Original.apply(&mut u, &[1.0; 5]).is_err());
    }
}
