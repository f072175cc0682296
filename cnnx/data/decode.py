"""Decode one image file into a model-sized uint8 (H, W, C) array at the decoder's speed.

When shrinking, the decoder reduces first: a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the
DCT (Pillow's draft mode), any other image is box-reduced by an integer factor, both only
down to REDUCING_GAP times the target, so the final anti-aliased resize still sees enough
pixels. Every step is Pillow's integer code: the same bytes give the same pixels every time.

Modes are unified: grey, palette, CMYK, 16-bit and float become RGB (or grey with
grayscale=True); transparent pixels are blended over white.
"""
import io
import warnings

import numpy as np

DEFAULT_MAX_PIXELS = 2 ** 26   # 8192 x 8192; larger files are refused as decompression bombs
REDUCING_GAP = 2.0             # reduce to >= 2x the target, then resize (Pillow's advice)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImage(Exception):
    """A file that cannot become a training image; the message is the reason."""


def load_image(path, image_size, grayscale=False, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode the file at `path` (a local path or fsspec URL); see decode_image."""
    from cnnx.data.sources import read_bytes
    return decode_image(read_bytes(path), image_size, grayscale, max_pixels)


def decode_image(data, image_size, grayscale=False, max_pixels=DEFAULT_MAX_PIXELS):
    """The bytes of an image file -> uint8 (H, W, C), C = 1 if grayscale else 3, resized
    with anti-aliasing to image_size = (H, W).

    Raises BadImage with the reason for an empty, corrupt, truncated, oversized, multi-frame
    or non-image file.
    """
    from PIL import Image

    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    height, width = (int(s) for s in image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:   # the header alone tells the size: refuse bombs before decoding them
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"decompression bomb: {error}") from None
        except Image.UnidentifiedImageError:   # its message holds an object address
            raise BadImage("not a readable image: no image format Pillow reads") from None
        except Exception as error:         # Pillow raises OSError, SyntaxError, ValueError...
            raise BadImage(f"not a readable image: {error}") from None
        pixels = image.size[0] * image.size[1]
        if pixels > max_pixels:
            raise BadImage(f"decompression bomb: {image.size[0]}x{image.size[1]} = {pixels} "
                           f"pixels exceeds max_pixels={max_pixels}")
        if getattr(image, "n_frames", 1) > 1:
            raise BadImage(f"unsupported image: {image.n_frames} frames (multi-frame or "
                           "volume); store one frame per file")
        try:
            if image.format == "JPEG":     # decode at the smallest DCT scale still >= gap x
                image.draft("L" if grayscale else None,
                            (int(width * REDUCING_GAP), int(height * REDUCING_GAP)))
            image = to_model_mode(image, grayscale)
            image = image.resize((width, height), Image.Resampling.BILINEAR,
                                 reducing_gap=REDUCING_GAP)
        except Exception as error:
            raise BadImage(f"corrupt or truncated image: {type(error).__name__}: {error}") \
                from None
    out = np.asarray(image, np.uint8)
    return out[..., np.newaxis] if out.ndim == 2 else out


def to_model_mode(image, grayscale):
    """Any Pillow image -> mode "L" (grayscale) or "RGB", alpha blended over white."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = _eight_bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    wanted = "L" if grayscale else "RGB"
    return image if image.mode == wanted else image.convert(wanted)


def _eight_bit(image):
    """16-bit integer (0..65535) or float (0..1) grey -> 8-bit grey, rounded, clipped."""
    from PIL import Image

    values = np.asarray(image, np.float64)
    scale = 1 / 257 if image.mode != "F" else 255.0
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
