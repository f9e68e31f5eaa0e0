//! Image files with the parameters that made them, where A1111 and other tools look:
//! a PNG `parameters` text chunk (`tEXt` when the text is Latin-1, else UTF-8 `iTXt`;
//! A1111 reads both), or the EXIF `UserComment` of a JPEG or WebP file (UTF-16,
//! as A1111 writes it through piexif). Metadata never costs the image: a file whose
//! metadata cannot be encoded is written without it, with a warning.
use std::path::Path;

use image::ImageEncoder;

use super::Image;
use crate::error::{Error, Result};

/// An image file format, chosen by the output file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    /// Baseline JPEG at a quality in 1..=100.
    Jpeg {
        quality: u8,
    },
    /// Lossless WebP.
    Webp,
}

impl ImageFormat {
    /// The extensions [`ImageFormat::from_path`] knows.
    pub const EXTENSIONS: &'static [&'static str] = &["png", "jpg", "jpeg", "webp"];

    /// The format `path`'s extension names (case-insensitive); `quality` is the JPEG's.
    pub fn from_path(path: &Path, quality: u8) -> Result<ImageFormat> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !(1..=100).contains(&quality) {
            return Err(Error::Invalid(format!(
                "JPEG quality {quality} is not in 1..=100"
            )));
        }
        match ext.as_str() {
            "png" => Ok(ImageFormat::Png),
            "jpg" | "jpeg" => Ok(ImageFormat::Jpeg { quality }),
            "webp" => Ok(ImageFormat::Webp),
            _ => Err(Error::Invalid(format!(
                "{}: cannot tell the image format from the extension `{ext}`; valid: {}",
                path.display(),
                Self::EXTENSIONS.join(", ")
            ))),
        }
    }
}

impl Image {
    /// The images side by side, as near a square as the count allows (row by row, 2
    /// pixels of black between them), with the first image's parameters.
    pub fn grid(images: &[Image]) -> Result<Image> {
        const GAP: usize = 2;
        let first = images
            .first()
            .ok_or_else(|| Error::Invalid("a grid needs at least one image".into()))?;
        let (w, h) = (first.width, first.height);
        if images.iter().any(|i| (i.width, i.height) != (w, h)) {
            return Err(Error::Invalid("a grid's images must share one size".into()));
        }
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        let rows = images.len().div_ceil(cols);
        let (gw, gh) = (cols * w + (cols - 1) * GAP, rows * h + (rows - 1) * GAP);
        let mut rgb = vec![0u8; gw * gh * 3];
        for (k, img) in images.iter().enumerate() {
            let (x0, y0) = ((k % cols) * (w + GAP), (k / cols) * (h + GAP));
            for y in 0..h {
                let dst = ((y0 + y) * gw + x0) * 3;
                rgb[dst..dst + w * 3].copy_from_slice(&img.rgb[y * w * 3..(y + 1) * w * 3]);
            }
        }
        Ok(Image {
            width: gw,
            height: gh,
            rgb,
            parameters: first.parameters.clone(),
            timings: first.timings,
        })
    }

    /// Writes the image with its parameters in `format`, atomically: the whole file
    /// appears at `path`, or nothing does.
    pub fn save(&self, path: &Path, format: ImageFormat) -> Result<()> {
        let bytes = self
            .encode(format)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        let staged = crate::staged::Staged::new(path, true)?;
        std::io::Write::write_all(&mut staged.file(), &bytes).map_err(|e| Error::io(path, e))?;
        staged.commit()
    }

    /// A picture file (PNG or JPEG) as an image without parameters.
    pub fn open(path: &Path) -> Result<Image> {
        let img = super::canvas::read(path)?.to_rgb8();
        Ok(Image {
            width: img.width() as usize,
            height: img.height() as usize,
            rgb: img.into_raw(),
            parameters: String::new(),
            timings: [0.0; 3],
        })
    }

    /// Writes a PNG with a `parameters` text chunk, atomically.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        self.save(path, ImageFormat::Png)
    }

    /// The PNG file [`Image::save_png`] writes, in memory.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        self.encode(ImageFormat::Png)
            .map_err(|e| Error::Invalid(format!("PNG encoding: {e}")))
    }

    /// The file's bytes in `format`, with the parameters where the format keeps them.
    pub fn encode(&self, format: ImageFormat) -> std::result::Result<Vec<u8>, String> {
        match self.encode_with(format, Some(&self.parameters)) {
            Ok(b) => Ok(b),
            Err(e) => {
                log::warn!("the image's parameters could not be stored ({e}); writing the image without them");
                self.encode_with(format, None)
            }
        }
    }

    fn encode_with(
        &self,
        format: ImageFormat,
        text: Option<&str>,
    ) -> std::result::Result<Vec<u8>, String> {
        let (w, h) = (self.width as u32, self.height as u32);
        let mut out = Vec::new();
        let text = text.filter(|t| !t.is_empty());
        match format {
            ImageFormat::Png => {
                let mut enc = png::Encoder::new(&mut out, w, h);
                enc.set_color(png::ColorType::Rgb);
                enc.set_depth(png::BitDepth::Eight);
                if let Some(t) = text {
                    let latin1 = t.chars().all(|c| (c as u32) < 256);
                    let chunk = if latin1 {
                        enc.add_text_chunk("parameters".into(), t.into())
                    } else {
                        enc.add_itxt_chunk("parameters".into(), t.into())
                    };
                    chunk.map_err(|e| e.to_string())?;
                }
                let mut writer = enc.write_header().map_err(|e| e.to_string())?;
                writer
                    .write_image_data(&self.rgb)
                    .map_err(|e| e.to_string())?;
                writer.finish().map_err(|e| e.to_string())?;
            }
            ImageFormat::Jpeg { quality } => {
                let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
                if let Some(t) = text {
                    enc.set_exif_metadata(exif_user_comment(t))
                        .map_err(|e| e.to_string())?;
                }
                enc.write_image(&self.rgb, w, h, image::ExtendedColorType::Rgb8)
                    .map_err(|e| e.to_string())?;
            }
            ImageFormat::Webp => {
                let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
                if let Some(t) = text {
                    enc.set_exif_metadata(exif_user_comment(t))
                        .map_err(|e| e.to_string())?;
                }
                enc.write_image(&self.rgb, w, h, image::ExtendedColorType::Rgb8)
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(out)
    }
}

/// A TIFF-structured EXIF block (big-endian, as piexif writes it) holding `text` as
/// the Exif IFD's UserComment in its `UNICODE` encoding (UTF-16BE): IFD0 with one
/// entry pointing at the Exif IFD, which has one entry pointing at the comment.
/// Tags from the EXIF 2.32 specification (CIPA DC-008): 0x8769 ExifIFDPointer,
/// 0x9286 UserComment.
pub fn exif_user_comment(text: &str) -> Vec<u8> {
    const HEADER: u32 = 8;
    const IFD: u32 = 2 + 12 + 4;
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(|u| u.to_be_bytes()));
    let mut b = Vec::with_capacity((HEADER + 2 * IFD) as usize + comment.len());
    b.extend(b"MM\0\x2a");
    b.extend(HEADER.to_be_bytes());
    let mut ifd = |tag: u16, ty: u16, count: u32, value: u32| {
        b.extend(1u16.to_be_bytes());
        b.extend(tag.to_be_bytes());
        b.extend(ty.to_be_bytes());
        b.extend(count.to_be_bytes());
        b.extend(value.to_be_bytes());
        b.extend(0u32.to_be_bytes());
    };
    // LONG (4) pointer to the Exif IFD; UNDEFINED (7) bytes of the comment.
    ifd(0x8769, 4, 1, HEADER + IFD);
    ifd(0x9286, 7, comment.len() as u32, HEADER + 2 * IFD);
    b.extend(comment);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(parameters: &str) -> Image {
        Image {
            width: 8,
            height: 4,
            rgb: (0..96).map(|i| (i * 5) as u8).collect(),
            parameters: parameters.into(),
            timings: [0.0; 3],
        }
    }

    /// The UserComment of an EXIF block written by [`exif_user_comment`], found in `file`.
    fn comment_in(file: &[u8]) -> String {
        let at = file
            .windows(8)
            .position(|w| w == b"UNICODE\0")
            .expect("no UNICODE UserComment");
        let count = u32::from_be_bytes(file[at - 12..at - 8].try_into().unwrap());
        let units: Vec<u16> = file[at + 8..at + count as usize]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).unwrap()
    }

    #[test]
    fn prompts_beyond_latin1_are_kept_as_utf8_itxt_and_latin1_ones_as_text() {
        for prompt in [
            "a red circle — on a “blue” background 猫 🐈",
            "café au lait",
        ] {
            let png = image(&format!("{prompt}\nSteps: 4")).to_png().unwrap();
            let reader = png::Decoder::new(std::io::Cursor::new(png))
                .read_info()
                .unwrap();
            let info = reader.info();
            let latin1 = info.uncompressed_latin1_text.iter().map(|t| t.text.clone());
            let utf8 = info.utf8_text.iter().map(|t| t.get_text().unwrap());
            let texts: Vec<String> = latin1.chain(utf8).collect();
            assert_eq!(texts, vec![format!("{prompt}\nSteps: 4")]);
            assert_eq!(
                info.utf8_text.is_empty(),
                prompt.is_ascii() || prompt.starts_with("café")
            );
        }
    }

    #[test]
    fn jpeg_and_webp_carry_the_parameters_as_an_exif_user_comment() {
        let text = "a “quoted” — prompt 猫\nSteps: 4, Sampler: Euler";
        for format in [ImageFormat::Jpeg { quality: 90 }, ImageFormat::Webp] {
            let bytes = image(text).encode(format).unwrap();
            assert_eq!(comment_in(&bytes), text, "{format:?}");
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (8, 4));
        }
    }

    #[test]
    fn the_format_follows_the_extension_and_an_unknown_one_is_refused() {
        assert_eq!(
            ImageFormat::from_path(Path::new("a/b.PNG"), 90).unwrap(),
            ImageFormat::Png
        );
        assert_eq!(
            ImageFormat::from_path(Path::new("b.jpeg"), 75).unwrap(),
            ImageFormat::Jpeg { quality: 75 }
        );
        assert_eq!(
            ImageFormat::from_path(Path::new("b.webp"), 90).unwrap(),
            ImageFormat::Webp
        );
        let e = ImageFormat::from_path(Path::new("out.gif"), 90)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out.gif") && e.contains("webp"), "{e}");
        assert!(ImageFormat::from_path(Path::new("b.jpg"), 0).is_err());
    }
}
