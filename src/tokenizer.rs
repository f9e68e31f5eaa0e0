//! CLIP's BPE tokenizer: text → token ids for the text encoders.
//!
//! The reference is transformers 4.x's Python `CLIPTokenizer`, the tokenizer SD
//! pipelines have used, as it behaves when `ftfy` is NOT installed. Its steps, all
//! reproduced here:
//!
//! 1. The raw text is split on the literal special tokens `<|startoftext|>` and
//!    `<|endoftext|>` (leftmost first); each one becomes its id directly.
//! 2. Every other piece is cleaned as BERT's `BasicTokenizer` does (with accent
//!    stripping and punctuation splitting off): NUL, U+FFFD and every character of
//!    general category C* except `\t\n\r` are dropped; `\t\n\r` and category Zs
//!    become a space; CJK ideographs get a space on each side; then NFC; then the
//!    text is split on whitespace, each word lowercased (full Unicode lowercase,
//!    with Greek final sigma) and the words joined with single spaces.
//! 3. The cleaned text is cut into words with CLIP's regex
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
//!    which Python compiles with IGNORECASE (see [`WORD_PATTERN`] for what that changes).
//! 4. Each word's UTF-8 bytes are mapped to GPT-2's printable byte symbols, `</w>`
//!    is appended to its last symbol and the BPE merges are applied by rank.
//!
//! Steps 1 and 2 and the regex of step 3 are ours: the `tokenizers` crate's
//! normalizers differ from Python in small ways that change ids (its lowercase
//! has no final sigma, its BERT cleanup keeps unassigned code points and has a
//! different CJK range, its special-token handling cannot see specials that only
//! appear after cleanup). Step 4 is a `tokenizers::Tokenizer`: BPE model, byte-level
//! pre-tokenizer, and the two specials as added tokens, fed the words pre-split.
//!
//! With ftfy installed, Python's CLIPTokenizer instead runs `ftfy.fix_text`,
//! collapses whitespace and lowercases: it then keeps zero-width joiners and other
//! format characters, does not space CJK ideographs, straightens curly quotes,
//! unescapes HTML entities and folds fullwidth forms and ligatures, so such
//! prompts get other ids. Printable ASCII without HTML entities is the same either
//! way. transformers 5.x's `CLIPTokenizer` (and 4.x's `CLIPTokenizerFast`) is the
//! tokenizers-library pipeline, which differs from the Python one on 19 of the 94
//! prompts of `tests/fixtures/tokenizer/clip.json` (CJK spacing, ZWJ and control
//! characters, final sigma, ...); the fixture records its ids too, untested.
//!
//! Unicode tables: general categories, NFC, lowercase and the regex classes come
//! from crates with Unicode 16 or later data; Python uses its own `unicodedata`
//! (15.1 in CPython 3.13). Code points assigned in between are dropped by Python as
//! unassigned (category Cn) and kept here. Every code point assigned in Unicode
//! 15.1 (a sample of the large CJK, Hangul and private-use blocks) was checked
//! against transformers, alone and in context, with no difference.
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};
use unicode_general_category::{get_general_category, GeneralCategory};
use unicode_normalization::UnicodeNormalization;

use crate::config::TextEncoderConfig;
use crate::error::{Error, Result};
use crate::vocab::{byte_symbols, ClipVocab, BOS, EOS};

/// Suffix the CLIP vocabulary puts on a word's last symbol.
const END_OF_WORD: &str = "</w>";

/// CLIP's word regex as Python's `regex` module runs it with IGNORECASE on text
/// that is already lowercase. Case-insensitivity matters for two characters only
/// (checked against every code point): `ſ` (U+017F LONG S) also matches the `s`
/// of `'s` and `<|startoftext|>`, and U+0345 (COMBINING GREEK YPOGEGRAMMENI, which
/// case-folds to a letter) is matched by neither the letter class nor the negated
/// class, so Python drops it. Uppercase variants are left out: nothing uppercase
/// survives the lowercasing.
const WORD_PATTERN: &str = r"<\|[sſ]tartoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+";

#[derive(Clone)]
pub struct ClipTokenizer {
    /// BPE over byte symbols; knows the two specials as added tokens, so a word
    /// that is exactly `<|startoftext|>` or `<|endoftext|>` maps to its id, as the
    /// Python tokenizer's BPE cache does.
    inner: Tokenizer,
    words: regex::Regex,
    bos: u32,
    eos: u32,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("CLIP vocabulary: {msg}"))
}

impl ClipTokenizer {
    /// Builds the tokenizer; fails (never panics) on a vocabulary that is empty,
    /// has duplicate tokens, malformed merges or merges over unknown tokens, or
    /// lacks a byte symbol or a special token. A vocabulary that passes cannot
    /// meet an unknown symbol, so no text is ever silently dropped.
    pub fn new(vocab: &ClipVocab) -> Result<Self> {
        if vocab.tokens.is_empty() {
            return Err(invalid("no tokens"));
        }
        let n = u32::try_from(vocab.tokens.len()).map_err(|_| invalid("more than 2^32 tokens"))?;
        let mut map = Vocab::default();
        for (id, tok) in (0..n).zip(&vocab.tokens) {
            if map.insert(tok.clone(), id).is_some() {
                return Err(invalid(format!("token `{tok}` appears twice")));
            }
        }
        for sym in byte_symbols() {
            for tok in [sym.to_string(), format!("{sym}{END_OF_WORD}")] {
                if !map.contains_key(&tok) {
                    return Err(invalid(format!("byte symbol `{tok}` is missing")));
                }
            }
        }
        let id_of = |tok: &str| {
            map.get(tok)
                .copied()
                .ok_or_else(|| invalid(format!("special token `{tok}` is missing")))
        };
        let (bos, eos) = (id_of(BOS)?, id_of(EOS)?);
        let merges = vocab
            .merges
            .iter()
            .map(|m| match m.split_once(' ') {
                // Python splits merges on any whitespace; byte symbols never contain any.
                Some((a, b))
                    if !a.is_empty()
                        && !b.is_empty()
                        && !a.contains(char::is_whitespace)
                        && !b.contains(char::is_whitespace) =>
                {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(invalid(format!("malformed BPE merge `{m}`"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(map, merges)
            .end_of_word_suffix(END_OF_WORD.to_string())
            .build()
            .map_err(invalid)?;
        let mut inner = Tokenizer::new(bpe);
        // The regex split is done before the words reach the tokenizer; only the
        // byte → symbol mapping is left for the pre-tokenizer.
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        inner
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(invalid)?;
        let words = regex::Regex::new(WORD_PATTERN).map_err(invalid)?;
        Ok(ClipTokenizer {
            inner,
            words,
            bos,
            eos,
        })
    }

    /// The tokenizer for the vocabulary shipped inside sdrs.
    pub fn embedded() -> Result<Self> {
        Self::new(&ClipVocab::embedded()?)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Token ids of `text`, without BOS/EOS and untruncated
    /// (`tokenizer(text, add_special_tokens=False).input_ids`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut words: Vec<String> = Vec::new();
        for piece in split_specials(text) {
            match piece {
                Piece::Special(s) => words.push(s.to_string()),
                Piece::Text(t) => words.extend(
                    self.words
                        .find_iter(&clean(t))
                        .map(|m| m.as_str().to_string()),
                ),
            }
        }
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode_fast(words, false)
            .map_err(|e| Error::Invalid(format!("CLIP tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// What SD pipelines feed the text encoder
    /// (`tokenizer(text, padding="max_length", max_length=max_len, truncation=True)`):
    /// BOS, the first `max_len - 2` tokens, EOS, then `pad` up to `max_len`.
    /// SD 1.x pads with EOS; SD 2.x and SDXL's OpenCLIP encoder with 0.
    pub fn encode_padded(&self, text: &str, max_len: usize, pad: u32) -> Result<Vec<u32>> {
        self.wrap(&self.encode(text)?, max_len, pad)
    }

    /// [`encode_padded`](Self::encode_padded) with the text encoder's own length and
    /// pad token.
    pub fn encode_for(&self, text: &str, encoder: &TextEncoderConfig) -> Result<Vec<u32>> {
        self.encode_padded(text, encoder.max_positions, encoder.pad_token)
    }

    fn wrap(&self, ids: &[u32], max_len: usize, pad: u32) -> Result<Vec<u32>> {
        let body = &ids[..ids.len().min(body_len(max_len)?)];
        let mut out = Vec::with_capacity(max_len);
        out.push(self.bos);
        out.extend_from_slice(body);
        out.push(self.eos);
        out.resize(max_len, pad);
        Ok(out)
    }
}

fn body_len(max_len: usize) -> Result<usize> {
    max_len.checked_sub(2).ok_or_else(|| {
        Error::Invalid(format!(
            "token sequence length {max_len} leaves no room for BOS and EOS"
        ))
    })
}

enum Piece<'a> {
    Special(&'static str),
    Text(&'a str),
}

/// Splits the raw text on the special tokens, as transformers does before any
/// cleanup (so `!!<|endoftext|>` keeps its special, while `!!<|ENDOFTEXT|>` only
/// meets the word regex after lowercasing, glued to the `!!`).
fn split_specials(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        // The two specials cannot overlap, so the earliest match is the only one.
        let next = [BOS, EOS]
            .into_iter()
            .filter_map(|s| rest.find(s).map(|i| (i, s)))
            .min_by_key(|&(i, _)| i);
        let Some((i, special)) = next else { break };
        if i > 0 {
            out.push(Piece::Text(&rest[..i]));
        }
        out.push(Piece::Special(special));
        rest = &rest[i + special.len()..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

/// transformers' `_is_control`: category C* (Cc, Cf, Cs, Co, Cn), except the three
/// whitespace controls.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r')
        && matches!(
            get_general_category(c),
            GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::Surrogate
                | GeneralCategory::PrivateUse
                | GeneralCategory::Unassigned
        )
}

/// transformers' `_is_whitespace`.
fn is_bert_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
        || get_general_category(c) == GeneralCategory::SpaceSeparator
}

/// The CJK ideograph blocks BERT surrounds with spaces (`_is_chinese_char`).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F
    )
}

/// Python's `str.isspace()`, which `str.split()` splits on. It differs from
/// `char::is_whitespace` by U+001C..U+001F (already dropped as controls here, but
/// kept so the function means what its name says).
fn is_py_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\u{1C}'..='\u{20}' | '\u{85}' | '\u{A0}' | '\u{1680}' | '\u{2000}'..='\u{200A}' | '\u{2028}' | '\u{2029}' | '\u{202F}' | '\u{205F}' | '\u{3000}')
}

/// Step 2 of the module documentation (BERT's BasicTokenizer as CLIPTokenizer
/// configures it).
fn clean(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\0' || c == '\u{FFFD}' || is_control(c) {
            continue;
        }
        if is_bert_whitespace(c) {
            s.push(' ');
        } else if is_cjk_ideograph(c) {
            s.push(' ');
            s.push(c);
            s.push(' ');
        } else {
            s.push(c);
        }
    }
    let nfc: String = s.nfc().collect();
    // Lowercasing word by word is what Python does; final sigma looks only within
    // a word in both, since whitespace is not case-ignorable.
    let words: Vec<String> = nfc
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::metadata;
    use crate::formats::gguf::GgufFile;

    struct Case {
        prompt: String,
        ids: Vec<u32>,
        padded_eos: Vec<u32>,
        padded_zero: Vec<u32>,
    }

    fn fixture() -> Vec<Case> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tokenizer/clip.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture"))
                .expect("fixture JSON");
        assert_eq!(
            v["generator"]["ftfy"],
            serde_json::Value::Bool(false),
            "fixture must come from CLIPTokenizer without ftfy"
        );
        let ids = |c: &serde_json::Value, k: &str| -> Vec<u32> {
            c[k].as_array()
                .expect(k)
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        };
        v["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| Case {
                prompt: c["prompt"].as_str().expect("prompt").to_string(),
                ids: ids(c, "ids"),
                padded_eos: ids(c, "padded_eos"),
                padded_zero: ids(c, "padded_zero"),
            })
            .collect()
    }

    #[test]
    fn every_fixture_prompt_gives_transformers_ids() {
        let t = ClipTokenizer::embedded().unwrap();
        let cases = fixture();
        assert!(cases.len() >= 60);
        let mut bad = Vec::new();
        for c in &cases {
            if t.encode(&c.prompt).unwrap() != c.ids
                || t.encode_padded(&c.prompt, 77, t.eos_id()).unwrap() != c.padded_eos
                || t.encode_padded(&c.prompt, 77, 0).unwrap() != c.padded_zero
            {
                bad.push(format!(
                    "{:?}: got {:?}, want {:?}",
                    c.prompt,
                    t.encode(&c.prompt).unwrap(),
                    c.ids
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{} of {} prompts differ:\n{}",
            bad.len(),
            cases.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn special_ids_and_padding_shape() {
        let t = ClipTokenizer::embedded().unwrap();
        assert_eq!((t.bos_id(), t.eos_id()), (49406, 49407));
        assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
        let p = t.encode_padded("a photo of a cat", 77, 0).unwrap();
        assert_eq!(p.len(), 77);
        assert_eq!(&p[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(p[7..].iter().all(|&x| x == 0));
        assert_eq!(t.encode_padded("a b c", 2, 0).unwrap(), vec![49406, 49407]);
        assert!(t.encode_padded("a", 1, 0).is_err());
        let sd1 = TextEncoderConfig::clip_l("");
        let open_clip = TextEncoderConfig::open_clip("", 1024, 24, 16, None);
        assert_eq!(
            t.encode_for("a", &sd1).unwrap(),
            t.encode_padded("a", 77, 49407).unwrap()
        );
        assert_eq!(
            t.encode_for("a", &open_clip).unwrap(),
            t.encode_padded("a", 77, 0).unwrap()
        );
    }

    #[test]
    fn vocab_from_gguf_and_from_merges_txt_tokenize_the_same() {
        let vocab = ClipVocab::embedded().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.gguf");
        let f = std::fs::File::create(&path).unwrap();
        let w = crate::formats::gguf::Writer::new(
            std::io::BufWriter::new(f),
            &metadata::tokenizer_kv(&vocab),
            &[],
            None,
        )
        .unwrap();
        std::io::Write::flush(&mut w.finish().unwrap()).unwrap();
        let from_gguf =
            metadata::read_tokenizer(&GgufFile::open(&path).unwrap()).expect("tokenizer in GGUF");
        assert_eq!(from_gguf, vocab);
        let from_merges = ClipVocab::from_merges_txt(&vocab.merges_txt()).unwrap();
        let tokenizers = [
            ClipTokenizer::new(&vocab).unwrap(),
            ClipTokenizer::new(&from_gguf).unwrap(),
            ClipTokenizer::new(&from_merges).unwrap(),
        ];
        for c in fixture() {
            for t in &tokenizers {
                assert_eq!(t.encode(&c.prompt).unwrap(), c.ids, "{:?}", c.prompt);
            }
        }
    }

    #[test]
    fn invalid_vocabularies_are_errors() {
        let good = ClipVocab::embedded().unwrap();
        let with = |f: &dyn Fn(&mut ClipVocab)| {
            let mut v = good.clone();
            f(&mut v);
            ClipTokenizer::new(&v).err().map(|e| e.to_string())
        };
        assert!(ClipTokenizer::new(&ClipVocab {
            tokens: vec![],
            merges: vec![]
        })
        .is_err());
        assert!(with(&|v| v.merges[5] = "nospace".into())
            .unwrap()
            .contains("malformed"));
        assert!(with(&|v| v.merges[5] = "a b c".into())
            .unwrap()
            .contains("malformed"));
        assert!(with(&|v| v.merges[5] = " a".into())
            .unwrap()
            .contains("malformed"));
        assert!(with(&|v| v.merges.push("zzzq# xy".into())).is_some());
        assert!(with(&|v| v.tokens[300] = v.tokens[301].clone())
            .unwrap()
            .contains("twice"));
        assert!(with(&|v| v.tokens[0] = "not a byte".into())
            .unwrap()
            .contains("byte symbol"));
        assert!(with(&|v| {
            v.tokens.pop();
        })
        .unwrap()
        .contains("<|endoftext|>"));
        // A merge whose halves exist but whose result is not a token.
        assert!(with(&|v| v.merges.push("<|endoftext|> <|endoftext|>".into())).is_some());
        assert!(with(&|_| {}).is_none());
    }

    #[test]
    fn cleanup_matches_basic_tokenizer_rules() {
        assert_eq!(clean("  A\tB\n\nC  "), "a b c");
        assert_eq!(clean("东京"), "东 京");
        assert_eq!(clean("zero\u{200b}width\u{200d}"), "zerowidth");
        assert_eq!(clean("cafe\u{301}"), "caf\u{e9}");
        assert_eq!(clean("ΟΔΟΣ ΣΑΣ"), "οδος σας");
        assert_eq!(clean("line\u{2028}sep"), "line sep");
    }
}
