//! Weighted prompt pieces → the text encoder's 77-token windows.
//!
//! A prompt of any length becomes as many windows as it needs, each BOS + 75 tokens +
//! EOS, padded, with a weight per token; their encodings are concatenated along the
//! token axis (A1111's long-prompt scheme, which stable-diffusion.cpp and ComfyUI share).
//! As in A1111:
//! - a window that fills up while a comma is at most [`COMMA_BACKTRACK`] tokens back is
//!   cut after the comma, and the words since then move to the next window, so a
//!   phrase is not split across two encodings;
//! - `BREAK` closes the window early;
//! - a textual-inversion trigger is matched on its token ids (the longest trigger
//!   first) and takes as many positions as its vectors, moved whole to the next window
//!   when it does not fit; its positions hold token 0 until the vectors replace them.
use crate::error::{Error, Result};
use crate::tokenizer::ClipTokenizer;

use super::parse::Piece;

/// How far back (tokens) a full window looks for a comma to cut at (A1111's default
/// `comma_padding_backtrack`).
pub const COMMA_BACKTRACK: usize = 20;

/// A textual-inversion trigger as one encoder sees it.
#[derive(Clone, Debug)]
pub struct Trigger {
    /// The trigger word's token ids.
    pub ids: Vec<u32>,
    /// How many token positions its vectors take.
    pub vectors: usize,
    /// Which embedding (the caller's index).
    pub embedding: usize,
}

/// Where an embedding's vectors go in a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fix {
    /// Position of the first vector in the window (BOS is position 0).
    pub offset: usize,
    pub embedding: usize,
}

/// One window: `len` token ids and weights, and the embeddings placed in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    pub fixes: Vec<Fix>,
}

/// Cuts prompts into windows for one text encoder.
pub struct Windows<'a> {
    tokenizer: &'a ClipTokenizer,
    /// Window length with BOS and EOS (77).
    len: usize,
    pad: u32,
    comma: Option<u32>,
    triggers: &'a [Trigger],
}

impl<'a> Windows<'a> {
    pub fn new(
        tokenizer: &'a ClipTokenizer,
        len: usize,
        pad: u32,
        triggers: &'a [Trigger],
    ) -> Result<Self> {
        if len < 3 {
            return Err(Error::Invalid(format!(
                "a text encoder of {len} positions has no room for a prompt"
            )));
        }
        let comma = match tokenizer.encode(",")?.as_slice() {
            [c] => Some(*c),
            _ => None,
        };
        Ok(Windows {
            tokenizer,
            len,
            pad,
            comma,
            triggers,
        })
    }

    fn body(&self) -> usize {
        self.len - 2
    }

    /// The window of an empty prompt (what shorter prompts are padded with).
    pub fn empty(&self) -> Chunk {
        self.close(Vec::new(), Vec::new(), Vec::new())
    }

    /// Pads `ids` to the body length with EOS, wraps them in BOS/EOS, and puts the
    /// encoder's pad token after the first EOS (SD 2 and bigG pad with 0, CLIP-L with EOS).
    fn close(&self, mut ids: Vec<u32>, mut weights: Vec<f32>, fixes: Vec<Fix>) -> Chunk {
        let eos = self.tokenizer.eos_id();
        ids.resize(self.body(), eos);
        weights.resize(self.body(), 1.0);
        ids.insert(0, self.tokenizer.bos_id());
        ids.push(eos);
        weights.insert(0, 1.0);
        weights.push(1.0);
        if let Some(first) = ids.iter().position(|&t| t == eos) {
            ids[first + 1..].iter_mut().for_each(|t| *t = self.pad);
        }
        // Offsets were counted without BOS.
        let fixes = fixes
            .into_iter()
            .map(|f| Fix {
                offset: f.offset + 1,
                ..f
            })
            .collect();
        Chunk {
            ids,
            weights,
            fixes,
        }
    }

    /// The longest trigger whose ids start at `tokens[at..]`.
    fn trigger_at(&self, tokens: &[u32], at: usize) -> Option<&Trigger> {
        self.triggers
            .iter()
            .filter(|t| !t.ids.is_empty() && tokens[at..].starts_with(&t.ids))
            .max_by_key(|t| t.ids.len())
    }

    /// The windows of a parsed prompt; always at least one.
    pub fn chunks(&self, pieces: &[Piece]) -> Result<Vec<Chunk>> {
        let body = self.body();
        let mut out = Vec::new();
        let (mut ids, mut weights, mut fixes): (Vec<u32>, Vec<f32>, Vec<Fix>) = Default::default();
        let mut last_comma: Option<usize> = None;
        macro_rules! next_window {
            () => {{
                out.push(self.close(
                    std::mem::take(&mut ids),
                    std::mem::take(&mut weights),
                    std::mem::take(&mut fixes),
                ));
                last_comma = None;
            }};
        }
        for piece in pieces {
            if piece.is_break() {
                next_window!();
                continue;
            }
            let tokens = self.tokenizer.encode(&piece.text)?;
            let weight = piece.weight as f32;
            let mut at = 0;
            while at < tokens.len() {
                let token = tokens[at];
                if Some(token) == self.comma {
                    last_comma = Some(ids.len());
                } else if let Some(c) =
                    last_comma.filter(|&c| ids.len() == body && body - c <= COMMA_BACKTRACK)
                {
                    let cut = c + 1;
                    let (moved_ids, moved_weights) = (ids.split_off(cut), weights.split_off(cut));
                    let moved_fixes: Vec<Fix> = fixes
                        .iter()
                        .filter(|f| f.offset >= cut)
                        .map(|f| Fix {
                            offset: f.offset - cut,
                            ..*f
                        })
                        .collect();
                    fixes.retain(|f| f.offset < cut);
                    next_window!();
                    (ids, weights, fixes) = (moved_ids, moved_weights, moved_fixes);
                }
                if ids.len() == body {
                    next_window!();
                }
                match self.trigger_at(&tokens, at) {
                    None => {
                        ids.push(token);
                        weights.push(weight);
                        at += 1;
                    }
                    Some(t) => {
                        if t.vectors > body {
                            return Err(Error::Invalid(format!("a textual-inversion embedding of {} vectors does not fit a {body}-token window", t.vectors)));
                        }
                        if ids.len() + t.vectors > body {
                            next_window!();
                        }
                        fixes.push(Fix {
                            offset: ids.len(),
                            embedding: t.embedding,
                        });
                        ids.extend(std::iter::repeat_n(0, t.vectors));
                        weights.extend(std::iter::repeat_n(weight, t.vectors));
                        at += t.ids.len();
                    }
                }
            }
        }
        if !ids.is_empty() || out.is_empty() {
            out.push(self.close(ids, weights, fixes));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::parse::parse;

    fn tok() -> ClipTokenizer {
        ClipTokenizer::embedded().unwrap()
    }

    #[test]
    fn a_short_unweighted_prompt_is_the_padded_encoding() {
        let t = tok();
        for pad in [t.eos_id(), 0] {
            let w = Windows::new(&t, 77, pad, &[]).unwrap();
            for prompt in ["a photo of a cat", "", "x, y, z"] {
                let c = w.chunks(&parse(prompt).unwrap()).unwrap();
                assert_eq!(c.len(), 1);
                assert_eq!(
                    c[0].ids,
                    t.encode_padded(prompt, 77, pad).unwrap(),
                    "{prompt:?}"
                );
                assert!(c[0].weights.iter().all(|&w| w == 1.0));
            }
        }
    }

    #[test]
    fn long_prompts_take_as_many_windows_as_they_need_and_break_starts_one() {
        let t = tok();
        let w = Windows::new(&t, 77, t.eos_id(), &[]).unwrap();
        let words = |n: usize| vec!["cat"; n].join(" ");
        assert_eq!(w.chunks(&parse(&words(75)).unwrap()).unwrap().len(), 1);
        let two = w.chunks(&parse(&words(76)).unwrap()).unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(
            two[1].ids[..3],
            [t.bos_id(), t.encode("cat").unwrap()[0], t.eos_id()]
        );
        let b = w.chunks(&parse("a cat BREAK a dog").unwrap()).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[1].ids[..4],
            t.encode_padded("a dog", 77, t.eos_id()).unwrap()[..4]
        );
    }

    #[test]
    fn a_full_window_is_cut_after_a_comma_up_to_20_tokens_back() {
        let t = tok();
        let w = Windows::new(&t, 77, t.eos_id(), &[]).unwrap();
        // 70 words, a comma, then 10 more: the 10 move to the second window whole.
        let prompt = format!("{}, {}", vec!["cat"; 70].join(" "), ["dog"; 10].join(" "));
        let c = w.chunks(&parse(&prompt).unwrap()).unwrap();
        assert_eq!(c.len(), 2);
        let dog = t.encode("dog").unwrap()[0];
        assert!(!c[0].ids.contains(&dog));
        assert_eq!(c[1].ids[1..11], [dog; 10]);
        // A comma further back than 20 tokens is not used.
        let prompt = format!(
            "{}, {}",
            vec!["cat"; 40].join(" "),
            vec!["dog"; 40].join(" ")
        );
        let c = w.chunks(&parse(&prompt).unwrap()).unwrap();
        assert_eq!(c[0].ids[75], dog);
    }

    #[test]
    fn weights_follow_their_tokens_and_triggers_take_their_vectors_positions() {
        let t = tok();
        let trig = Trigger {
            ids: t.encode("<birb-style>").unwrap(),
            vectors: 3,
            embedding: 7,
        };
        let w = Windows::new(&t, 77, 0, std::slice::from_ref(&trig)).unwrap();
        let c = w
            .chunks(&parse("a (red:1.5) <birb-style> bird").unwrap())
            .unwrap();
        assert_eq!(c.len(), 1);
        let c = &c[0];
        assert_eq!(c.weights[..7], [1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(
            c.fixes,
            vec![Fix {
                offset: 3,
                embedding: 7
            }]
        );
        assert_eq!(c.ids[3..6], [0, 0, 0]);
        assert_eq!(c.ids[6], t.encode("bird").unwrap()[0]);
        assert_eq!(c.ids[7], t.eos_id());
        assert_eq!(c.ids[8], 0);
    }
}
