//! A1111's prompt emphasis syntax, parsed into (text, weight) pieces.
//!
//! The grammar is the one stable-diffusion-webui documents for
//! `parse_prompt_attention`, reproduced piece for piece because prompts are shared
//! between front ends and must mean the same everywhere:
//! - `(text)` multiplies the weight of everything inside by 1.1, `[text]` divides it by
//!   1.1, `(text:1.3)` multiplies it by 1.3; brackets nest, and their factors multiply;
//! - an unclosed bracket applies its factor to everything after it; a closing bracket
//!   with nothing open is text;
//! - `\(`, `\)`, `\[`, `\]` and `\\` are the literal characters;
//! - the word `BREAK` (upper case, whole word) ends the current 75-token window.
//!
//! Kept as A1111 has them, because prompts written for it rely on them:
//! - the weight needs the colon right after the text and no space before `)`:
//!   `(a: 1.3)` is the text `a: 1.3` at 1.1;
//! - a `BREAK` inside brackets has its marker weight multiplied, which makes it the
//!   word "BREAK" (with a negative weight), not a window break;
//! - neighbouring pieces of exactly equal weight are merged.
//!
//! Where A1111 raises an exception (a weight such as `1.2.3` that is not a number),
//! this parser returns an error naming it. Weights are read in ASCII digits only
//! (Python's `\d` and `float` also take other scripts' digits).
use crate::error::{Error, Result};

/// The weight of the `BREAK` marker piece.
pub const BREAK_WEIGHT: f64 = -1.0;

/// One run of prompt text and the weight its tokens get.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub text: String,
    pub weight: f64,
}

impl Piece {
    fn new(text: &str, weight: f64) -> Self {
        Piece {
            text: text.to_string(),
            weight,
        }
    }

    /// Whether this is a window break (`BREAK` outside any bracket).
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == BREAK_WEIGHT
    }
}

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// One lexical token of the emphasis syntax.
enum Lex<'a> {
    /// `\(`, `\\`, or a lone `\`: the text after the backslash.
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.3)` and the number's text.
    Weight(&'a str, &'a str),
    Close,
    CloseSquare,
    Text(&'a str),
}

/// Splits `s` as A1111's tokenizing regular expression does, alternatives tried in
/// its order at each position.
fn lex(s: &str) -> Vec<Lex<'_>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // Each token and its length in bytes.
        let (lex, len) = match b[i] {
            b'\\' => match b.get(i + 1) {
                Some(b'(' | b')' | b'[' | b']' | b'\\') => (Lex::Escaped(&s[i + 1..i + 2]), 2),
                _ => (Lex::Escaped(""), 1),
            },
            b'(' => (Lex::Open, 1),
            b'[' => (Lex::OpenSquare, 1),
            b')' => (Lex::Close, 1),
            b']' => (Lex::CloseSquare, 1),
            b':' => {
                // `:([+-]?[.\d]+)\)`, with ASCII digits (see the module notes).
                let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
                let digits = b[i + 1 + sign..]
                    .iter()
                    .take_while(|c| matches!(c, b'0'..=b'9' | b'.'))
                    .count();
                let end = i + 1 + sign + digits;
                if digits > 0 && b.get(end) == Some(&b')') {
                    (Lex::Weight(&s[i..=end], &s[i + 1..end]), end + 1 - i)
                } else {
                    (Lex::Text(":"), 1)
                }
            }
            _ => {
                let len = b[i..]
                    .iter()
                    .position(|c| matches!(c, b'\\' | b'(' | b')' | b'[' | b']' | b':'))
                    .unwrap_or(b.len() - i);
                (Lex::Text(&s[i..i + len]), len)
            }
        };
        out.push(lex);
        i += len;
    }
    out
}

/// Splits on `\s*\bBREAK\b\s*` (Python's Unicode word boundaries and white space).
fn split_breaks(text: &str) -> Vec<&str> {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut parts = Vec::new();
    let mut start = 0; // start of the current part
    let mut from = 0; // where to search next
    while let Some(at) = text[from..].find("BREAK").map(|n| from + n) {
        let end = at + "BREAK".len();
        if word(text[..at].chars().next_back()) || word(text[end..].chars().next()) {
            from = at + 1;
            continue;
        }
        let before = text[start..at].trim_end_matches(char::is_whitespace);
        let after =
            end + (text[end..].len() - text[end..].trim_start_matches(char::is_whitespace).len());
        // The leading `\s*` may not reach back past the start of this part.
        parts.push(&text[start..start + before.len()]);
        start = after;
        from = after;
    }
    parts.push(&text[start..]);
    parts
}

/// The (text, weight) pieces of `prompt`; see the module notes.
pub fn parse(prompt: &str) -> Result<Vec<Piece>> {
    let mut res: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Piece>, from: usize, m: f64| {
        res[from..].iter_mut().for_each(|p| p.weight *= m)
    };
    for lex in lex(prompt) {
        match lex {
            Lex::Escaped(t) => res.push(Piece::new(t, 1.0)),
            Lex::Open => round.push(res.len()),
            Lex::OpenSquare => square.push(res.len()),
            Lex::Weight(all, number) => match round.pop() {
                Some(from) => {
                    let w: f64 = number.parse().map_err(|_| {
                        Error::Invalid(format!("prompt: the weight in `{all}` is not a number"))
                    })?;
                    multiply(&mut res, from, w);
                }
                None => push_text(&mut res, all),
            },
            Lex::Close => match round.pop() {
                Some(from) => multiply(&mut res, from, ROUND),
                None => push_text(&mut res, ")"),
            },
            Lex::CloseSquare => match square.pop() {
                Some(from) => multiply(&mut res, from, SQUARE),
                None => push_text(&mut res, "]"),
            },
            Lex::Text(t) => push_text(&mut res, t),
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push(Piece::new("", 1.0));
    }
    let mut merged: Vec<Piece> = Vec::with_capacity(res.len());
    for p in res {
        match merged.last_mut() {
            Some(last) if last.weight == p.weight => last.text.push_str(&p.text),
            _ => merged.push(p),
        }
    }
    Ok(merged)
}

fn push_text(res: &mut Vec<Piece>, text: &str) {
    for (i, part) in split_breaks(text).into_iter().enumerate() {
        if i > 0 {
            res.push(Piece::new("BREAK", BREAK_WEIGHT));
        }
        res.push(Piece::new(part, 1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str) -> Vec<(String, f64)> {
        parse(s)
            .unwrap()
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn p(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    #[test]
    fn documented_examples_parse_as_a1111_documents_them() {
        assert_eq!(pieces("normal text"), p(&[("normal text", 1.0)]));
        assert_eq!(
            pieces("an (important) word"),
            p(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(pieces("(unbalanced"), p(&[("unbalanced", 1.1)]));
        assert_eq!(pieces(r"\(literal\]"), p(&[("(literal]", 1.0)]));
        assert_eq!(
            pieces("(unnecessary)(parens)"),
            p(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            pieces("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            p(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1)
            ])
        );
    }

    #[test]
    fn break_splits_only_whole_words_and_eats_the_space_around_it() {
        assert_eq!(
            pieces("a BREAK b"),
            p(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(pieces("BREAKfast"), p(&[("BREAKfast", 1.0)]));
        assert_eq!(pieces("a break b"), p(&[("a break b", 1.0)]));
        assert_eq!(pieces("x_BREAK y"), p(&[("x_BREAK y", 1.0)]));
        // Inside brackets the marker's weight is multiplied: no longer a break.
        assert!(!parse("(a BREAK b)").unwrap().iter().any(Piece::is_break));
    }

    #[test]
    fn a_weight_that_is_not_a_number_is_an_error_not_a_guess() {
        assert!(parse("(a:1.2.3)").is_err());
        assert!(parse("(a:.)").is_err());
        assert_eq!(pieces("a:1.5) b"), p(&[("a:1.5) b", 1.0)]));
    }
}
