//! The CLIP BPE vocabulary (OpenAI's merges list, embedded from `vendor/clip`).
//!
//! Token ids, as OpenAI's `SimpleTokenizer` builds them: the 256 byte symbols of
//! `bytes_to_unicode`, the same with `</w>`, one token per merge, then
//! `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
use std::io::Read;

use crate::error::{Error, Result};

static BPE_GZ: &[u8] = include_bytes!("../vendor/clip/bpe_simple_vocab_16e6.txt.gz");

/// Merges used by CLIP: 49152 - 256 - 2 lines after the header.
pub const CLIP_MERGES: usize = 48894;
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

#[derive(Clone, Debug, PartialEq)]
pub struct ClipVocab {
    /// Token strings, index = id.
    pub tokens: Vec<String>,
    /// Merge rules, `"a b"`, in priority order.
    pub merges: Vec<String>,
}

/// GPT-2/CLIP's reversible byte → printable character table, in id order.
pub fn byte_symbols() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

impl ClipVocab {
    /// The vocabulary shipped inside sdrs.
    pub fn embedded() -> Result<ClipVocab> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| Error::Invalid(format!("embedded CLIP vocabulary: {e}")))?;
        let merges: Vec<String> = text
            .lines()
            .skip(1)
            .take(CLIP_MERGES)
            .map(str::to_string)
            .collect();
        Self::from_merges(merges)
    }

    /// Builds the id table from a merges list (as in `merges.txt` without its header).
    pub fn from_merges(merges: Vec<String>) -> Result<ClipVocab> {
        let syms = byte_symbols();
        let mut tokens: Vec<String> = syms.iter().map(|c| c.to_string()).collect();
        tokens.extend(syms.iter().map(|c| format!("{c}</w>")));
        for m in &merges {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| Error::Invalid(format!("malformed BPE merge `{m}`")))?;
            tokens.push(format!("{a}{b}"));
        }
        tokens.push(BOS.into());
        tokens.push(EOS.into());
        Ok(ClipVocab { tokens, merges })
    }

    /// From Hugging Face `merges.txt` content (first line `#version: ...`).
    pub fn from_merges_txt(text: &str) -> Result<ClipVocab> {
        let merges = text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.is_empty())
            .map(str::to_string)
            .collect();
        Self::from_merges(merges)
    }
}

impl ClipVocab {
    /// Hugging Face `vocab.json` content (token → id).
    pub fn vocab_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
            .collect();
        serde_json::Value::Object(map).to_string()
    }
    /// Hugging Face `merges.txt` content.
    pub fn merges_txt(&self) -> String {
        let mut s = String::from("#version: 0.2\n");
        for m in &self.merges {
            s.push_str(m);
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_vocab_equals_hugging_face_clip_tokenizer_files() {
        let v = ClipVocab::embedded().unwrap();
        assert_eq!(v.tokens.len(), crate::config::CLIP_VOCAB);
        let hf = crate::testdata::fixture("clip-hf");
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(&std::fs::read_to_string(hf.join("vocab.json")).unwrap()).unwrap();
        assert_eq!(vocab.len(), v.tokens.len());
        for (tok, id) in &vocab {
            assert_eq!(&v.tokens[*id as usize], tok, "id {id}");
        }
        let merges =
            ClipVocab::from_merges_txt(&std::fs::read_to_string(hf.join("merges.txt")).unwrap())
                .unwrap();
        assert_eq!(merges, v);
    }
}
