//! A1111's extra-network tags in prompts: `<lora:NAME>`, `<lora:NAME:MULTIPLIER>` and
//! `<lora:NAME:TE:UNET>` (also `<lyco:…>`, the LyCORIS extension's spelling) pick
//! LoRAs by name and are removed from the text the encoders see. As in A1111, the
//! first number weighs the text encoders' branches and the second the UNet's (the
//! first again when absent); `te=` and `unet=` name them instead.
use crate::error::{Error, Result};

/// A LoRA named in a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    pub name: String,
    /// The multiplier of its branches on the text encoders.
    pub te: f32,
    /// The multiplier of its branches on the UNet.
    pub unet: f32,
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
        let kind = ["lora:", "lyco:"].into_iter().find(|k| {
            after
                .get(..k.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(k))
        });
        let (Some(kind), Some(end)) = (kind, after.find('>')) else {
            text.push_str(&rest[..=at]);
            rest = after;
            continue;
        };
        let body = &after[kind.len()..end];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or_default().trim();
        if name.is_empty() {
            return Err(Error::Invalid(format!(
                "prompt: `<{kind}{body}>` names no LoRA"
            )));
        }
        let (te, unet) = multipliers(kind, body, parts)?;
        tags.push(LoraTag {
            name: name.to_string(),
            te,
            unet,
        });
        text.push_str(&rest[..at]);
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

/// The text-encoder and UNet multipliers of a tag's fields after its name.
fn multipliers<'a>(
    kind: &str,
    body: &str,
    fields: impl Iterator<Item = &'a str>,
) -> Result<(f32, f32)> {
    let number = |m: &str| {
        m.trim()
            .parse::<f32>()
            .ok()
            .filter(|m| m.is_finite())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "prompt: `{m}` in `<{kind}{body}>` is not a multiplier"
                ))
            })
    };
    let (mut te, mut unet) = (None, None);
    let mut positional = 0;
    for field in fields.map(str::trim) {
        match field.split_once('=') {
            Some((key, value)) => match key.trim().to_ascii_lowercase().as_str() {
                "te" => te = Some(number(value)?),
                "unet" => unet = Some(number(value)?),
                // A1111's dynamic-rank option: sdrs applies LoRAs at full rank.
                "dyn" => log::warn!("prompt: `<{kind}{body}>`: `{field}` is ignored (LoRAs are applied at full rank)"),
                _ => return Err(Error::Invalid(format!("prompt: unknown field `{field}` in `<{kind}{body}>` (te=, unet=)"))),
            },
            None if field.is_empty() && positional == 0 => positional += 1,
            None => {
                let v = number(field)?;
                match positional {
                    0 => te = Some(v),
                    1 => unet = Some(v),
                    _ => return Err(Error::Invalid(format!("prompt: `<{kind}{body}>` has more than two multipliers"))),
                }
                positional += 1;
            }
        }
    }
    let te = te.unwrap_or(1.0);
    Ok((te, unet.unwrap_or(te)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out_and_other_angle_brackets_stay() {
        let (t, tags) =
            take_loras("a cat <lora:catundchat:0.8>, <birb-style> <LoRA:x> <lyco:y:-1.5>").unwrap();
        assert_eq!(t, "a cat , <birb-style>  ");
        let tag = |name: &str, te: f32, unet: f32| LoraTag {
            name: name.into(),
            te,
            unet,
        };
        assert_eq!(
            tags,
            vec![
                tag("catundchat", 0.8, 0.8),
                tag("x", 1.0, 1.0),
                tag("y", -1.5, -1.5)
            ]
        );
        assert_eq!(
            take_loras("a < b > c <lora").unwrap(),
            ("a < b > c <lora".to_string(), vec![])
        );
        assert!(take_loras("<lora::1>").is_err());
        assert!(take_loras("<lora:n:strong>").is_err());
    }

    #[test]
    fn a_second_multiplier_weighs_the_unet_apart_from_the_text_encoders() {
        let one = |p: &str| take_loras(p).unwrap().1.remove(0);
        assert_eq!(
            (one("<lora:n:0.5:0.7>").te, one("<lora:n:0.5:0.7>").unet),
            (0.5, 0.7)
        );
        assert_eq!(
            (one("<lora:n:0.5>").te, one("<lora:n:0.5>").unet),
            (0.5, 0.5)
        );
        assert_eq!(
            (
                one("<lora:n:unet=0.2:te=0.3>").te,
                one("<lora:n:unet=0.2:te=0.3>").unet
            ),
            (0.3, 0.2)
        );
        assert_eq!(
            (one("<lora:n:0.4:dyn=8>").te, one("<lora:n:0.4:dyn=8>").unet),
            (0.4, 0.4)
        );
        assert!(take_loras("<lora:n:1:2:3>").is_err());
        assert!(take_loras("<lora:n:strength=1>").is_err());
    }

    /// Found by the `prompt` fuzz target: `<l` then a two-byte character puts byte 5
    /// inside it.
    #[test]
    fn a_tag_prefix_cut_inside_a_multibyte_character_is_plain_text() {
        assert_eq!(
            take_loras("<lüüra x>").unwrap(),
            ("<lüüra x>".to_string(), vec![])
        );
        assert_eq!(take_loras("<lor\u{e9}").unwrap().0, "<lor\u{e9}");
    }
}
