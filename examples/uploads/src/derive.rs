//! What the handler derives from one uploaded object, without IO: the
//! image decoded (format sniffed from its bytes, not trusted from its
//! name), a thumbnail within `max_side` pixels encoded as PNG, and the
//! metadata document. CPU-bound: the handler runs it on the blocking pool.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};

/// The metadata JSON written beside each thumbnail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub source: Source,
    /// `png`, `jpeg`: what the bytes are, whatever the key says.
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// The decoded colour type (`Rgb8`, `Rgba8`, `L8`, ...).
    pub color: String,
    pub thumbnail: Thumbnail,
}

/// The object the metadata describes, as its event named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub bucket: String,
    pub key: String,
    /// Bytes read from the store.
    pub size: u64,
    pub etag: Option<String>,
    pub sequencer: Option<String>,
    pub event_time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thumbnail {
    pub bucket: String,
    pub key: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
}

/// A decoded upload: its thumbnail's PNG bytes and what it is.
#[derive(Debug)]
pub struct Derived {
    pub png: Vec<u8>,
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub color: String,
    pub thumb_width: u32,
    pub thumb_height: u32,
}

/// Why an object yields no thumbnail. Permanent: the same bytes fail the
/// same way on every attempt.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error("not an image (format not recognised from its first bytes; png and jpeg are read)")]
    UnknownFormat,
    #[error("cannot decode the {format} image: {error}")]
    Decode { format: &'static str, error: image::ImageError },
    /// The JPEG decoder fills a cut-off scan with grey instead of failing;
    /// a thumbnail of half a photo is worse than none.
    #[error("cannot decode the {format} image: truncated (no end-of-image marker)")]
    Truncated { format: &'static str },
    #[error("cannot encode the thumbnail: {0}")]
    Encode(image::ImageError),
}

/// The largest decoded image accepted: a decompression bomb (a small file
/// claiming a huge canvas) fails as a decode error instead of exhausting
/// the worker's memory.
const MAX_PIXELS_SIDE: u32 = 16_384;
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Decodes `bytes` and makes a thumbnail whose longer side is at most
/// `max_side` (never enlarged), keeping the aspect ratio.
pub fn derive(bytes: &[u8], max_side: u32) -> Result<Derived, DeriveError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DeriveError::Decode { format: "unknown", error: e.into() })?;
    let format = reader.format().ok_or(DeriveError::UnknownFormat)?;
    let name = format_name(format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_PIXELS_SIDE);
    limits.max_image_height = Some(MAX_PIXELS_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    if format == ImageFormat::Jpeg && !ends_with_eoi(bytes) {
        return Err(DeriveError::Truncated { format: name });
    }
    let image = reader.decode().map_err(|error| DeriveError::Decode { format: name, error })?;
    let thumb = if image.width() <= max_side && image.height() <= max_side {
        image.clone()
    } else {
        image.thumbnail(max_side, max_side)
    };
    let mut png = Vec::new();
    thumb.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).map_err(DeriveError::Encode)?;
    Ok(Derived {
        png,
        format,
        width: image.width(),
        height: image.height(),
        color: format!("{:?}", image.color()),
        thumb_width: thumb.width(),
        thumb_height: thumb.height(),
    })
}

/// A whole JPEG ends with its EOI marker (`FF D9`), padding aside. Inside
/// the entropy-coded data a `FF` byte is always stuffed (`FF 00`), so a
/// file cut anywhere there does not end with one.
fn ends_with_eoi(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|b| !matches!(b, 0x00 | b'\r' | b'\n' | b' ')).map_or(0, |i| i + 1);
    bytes[..end].ends_with(&[0xFF, 0xD9])
}

/// The lower-case name used in metadata and errors.
pub fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        // Recognised by magic bytes but not decoded by this build (only
        // png and jpeg are compiled in): the decode error says so.
        other => other.extensions_str().first().copied().unwrap_or("unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, RgbImage};

    fn encoded(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 7]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img).write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    #[test]
    fn thumbnails_fit_the_bound_and_keep_the_aspect_ratio() {
        let d = derive(&encoded(640, 320, ImageFormat::Jpeg), 128).unwrap();
        assert_eq!((d.format, d.width, d.height), (ImageFormat::Jpeg, 640, 320));
        assert_eq!((d.thumb_width, d.thumb_height), (128, 64));
        let thumb = image::load_from_memory_with_format(&d.png, ImageFormat::Png).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (128, 64));
        // Small images are not enlarged.
        let d = derive(&encoded(40, 90, ImageFormat::Png), 128).unwrap();
        assert_eq!((d.format, d.thumb_width, d.thumb_height), (ImageFormat::Png, 40, 90));
    }

    #[test]
    fn poison_is_told_apart_by_what_is_wrong() {
        let text = derive(b"just some text, not a picture", 128).unwrap_err();
        assert!(matches!(text, DeriveError::UnknownFormat), "{text}");
        let whole = encoded(300, 200, ImageFormat::Png);
        let truncated = derive(&whole[..whole.len() / 2], 128).unwrap_err();
        assert!(matches!(truncated, DeriveError::Decode { format: "png", .. }), "{truncated}");
        let whole = encoded(300, 200, ImageFormat::Jpeg);
        let truncated = derive(&whole[..whole.len() / 3], 128).unwrap_err();
        assert!(matches!(truncated, DeriveError::Truncated { format: "jpeg" }), "{truncated}");
    }
}
