"""The Pillow decoder on real photos (scikit-image's samples written as JPEG and PNG): close to
scikit-image's exact anti-aliased resize, deterministic, and strict about broken files."""
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as samples
from skimage import io as skio
from skimage.transform import resize

from cnnx import data
from cnnx.data.decode import decode_image

# Measured over six sample photos at 1024x768 -> 80x80: 46.9-52.8 dB against scikit-image's
# resize(anti_aliasing=True) of the full decode (today's load_image, a block mean before that
# resize, scores 37.8-45.8 dB against the same reference).
MIN_PSNR_DB = 40.0


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def encoded(pixels, mode, file_format):
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, file_format)
    return buffer.getvalue()


@pytest.fixture(scope="module", params=["astronaut", "coffee"])
def photo(request):
    """A sample photo at a real camera-like size, 640x480."""
    image = resize(getattr(samples, request.param)(), (480, 640), order=3)
    return np.round(image * 255).astype(np.uint8)


@pytest.mark.parametrize("file_format", ["JPEG", "PNG"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoded_photo_is_close_to_exact_antialiased_resize(photo, file_format, mode):
    blob = encoded(photo, mode, file_format)
    got = decode_image(blob, (80, 80), grayscale=mode == "L")
    exact = resize(skio.imread(io.BytesIO(blob)), (80, 80), anti_aliasing=True)
    exact = np.round(exact * 255).astype(np.uint8).reshape(got.shape)
    assert got.shape == (80, 80, 1 if mode == "L" else 3) and got.dtype == np.uint8
    assert psnr(got, exact) >= MIN_PSNR_DB
    np.testing.assert_array_equal(decode_image(blob, (80, 80), grayscale=mode == "L"), got)


@pytest.mark.parametrize("value, expected", [(65535, 255), (32768, 128), (1000, 4)])
def test_sixteen_bit_grey_scales_to_eight_bits(tmp_path, value, expected):
    Image.fromarray(np.full((20, 20), value, np.uint16)).save(tmp_path / "g.png")
    image = data.load_image(tmp_path / "g.png", (2, 2), grayscale=True)
    np.testing.assert_array_equal(image, np.full((2, 2, 1), expected))


def test_truncated_jpeg_decoded_in_draft_mode_is_refused(photo):
    blob = encoded(photo, "RGB", "JPEG")
    with pytest.raises(data.BadImage, match="corrupt or truncated image: OSError"):
        decode_image(blob[:len(blob) // 2], (20, 20))


def test_multi_frame_tiff_is_refused(tmp_path):
    frames = [Image.new("L", (8, 8), value) for value in (0, 100, 200)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(data.BadImage, match="3 frames"):
        data.load_image(tmp_path / "stack.tif", (4, 4))


def test_unreadable_bytes_give_a_reason_without_object_addresses():
    with pytest.raises(data.BadImage) as error:
        decode_image(b"not an image", (4, 4))
    assert str(error.value) == "not a readable image: no image format Pillow reads"
