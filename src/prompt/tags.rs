//! A1111's extra-network tags in prompts: `<lora:NAME>` and `<lora:NAME:MULTIPLIER>`
//! (also `<lyco:…>`, the LyCORIS extension's spelling) pick LoRAs by name and are
//! removed from the text the encoders see.
use crate::error::{Error, Result};

/// A LoRA named in a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub multiplier: f32,
}

/// The prompt without its LoRA tags, and the tags in order. Other `<…>` text
/// (textual-inversion triggers such as `<birb-style>`) is left alone.
pub fn take_loras(prompt: &str) -> Result<(String, Vec<LoraTag>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(at) = rest.find('<') {
        let after = &rest[at + 1..];
        // `get`, not slicing: the fifth byte may fall inside a multibyte character.
        let kind = ["lora:", "lyco:"].into_iter().find(|k| after.get(..k.len()).is_some_and(|head| head.eq_ignore_ascii_case(k)));
        let (Some(kind), Some(end)) = (kind, after.find('>')) else {
            text.push_str(&rest[..=at]);
            rest = after;
            continue;
        };
        let body = &after[kind.len()..end];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or_default().trim();
        if name.is_empty() {
            return Err(Error::Invalid(format!("prompt: `<{kind}{body}>` names no LoRA")));
        }
        let multiplier = match parts.next().map(str::trim) {
            None | Some("") => 1.0,
            Some(m) => m.parse::<f32>().ok().filter(|m| m.is_finite()).ok_or_else(|| Error::Invalid(format!("prompt: the multiplier in `<{kind}{body}>` is not a number")))?,
        };
        tags.push(LoraTag { name: name.to_string(), multiplier });
        text.push_str(&rest[..at]);
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out_and_other_angle_brackets_stay() {
        let (t, tags) = take_loras("a cat <lora:catundchat:0.8>, <birb-style> <LoRA:x> <lyco:y:-1.5>").unwrap();
        assert_eq!(t, "a cat , <birb-style>  ");
        assert_eq!(tags, vec![LoraTag { name: "catundchat".into(), multiplier: 0.8 }, LoraTag { name: "x".into(), multiplier: 1.0 }, LoraTag { name: "y".into(), multiplier: -1.5 }]);
        assert_eq!(take_loras("a < b > c <lora").unwrap(), ("a < b > c <lora".to_string(), vec![]));
        // A1111's extra fields (text-encoder/UNet split) after the multiplier are ignored.
        assert_eq!(take_loras("<lora:n:0.5:0.7>").unwrap().1[0].multiplier, 0.5);
        assert!(take_loras("<lora::1>").is_err());
        assert!(take_loras("<lora:n:strong>").is_err());
    }

    /// Found by the `prompt` fuzz target: `<l` then a two-byte character puts byte 5
    /// inside it.
    #[test]
    fn a_tag_prefix_cut_inside_a_multibyte_character_is_plain_text() {
        assert_eq!(take_loras("<lüüra x>").unwrap(), ("<lüüra x>".to_string(), vec![]));
        assert_eq!(take_loras("<lor\u{e9}").unwrap().0, "<lor\u{e9}");
    }
}
