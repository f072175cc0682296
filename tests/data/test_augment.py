"""Augment: properties of each operation, determinism per key."""
import numpy as np
import pytest

from cnnx.data import Augment

FULL = dict(horizontal_flip=0.5, vertical_flip=0.5, rotation=20, zoom=0.2, translation=0.1,
            contrast=0.3, invert=0.2)


@pytest.fixture
def images(rng):
    return rng.standard_normal((16, 9, 11, 3)).astype(np.float32)


@pytest.mark.parametrize("flip", ["horizontal_flip", "vertical_flip"])
def test_flip_is_an_involution(images, flip):
    augment = Augment(**{flip: 1.0})
    once = augment(images, 0)
    axis = 2 if flip == "horizontal_flip" else 1
    np.testing.assert_array_equal(once, np.flip(images, axis=axis))
    np.testing.assert_array_equal(augment(once, 0), images)


def test_flip_probability_is_per_image(images):
    flipped = Augment(horizontal_flip=0.5)(np.repeat(images[:1], 400, axis=0), 1)
    changed = (flipped != images[:1]).any(axis=(1, 2, 3))
    assert 150 < changed.sum() < 250


def test_no_augmentation_is_the_identity(images):
    np.testing.assert_array_equal(Augment()(images, 0), images)
    np.testing.assert_array_equal(Augment(zoom=(1, 1), rotation=(0, 0))(images, 0), images)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_rotation_by_90_degrees_is_rot90(interpolation):
    square = np.random.default_rng(0).random((3, 7, 7, 2), dtype=np.float32)
    got = Augment(rotation=(90, 90), interpolation=interpolation)(square, 0)
    np.testing.assert_allclose(got, np.rot90(square, 1, axes=(1, 2)), atol=1e-5)


def test_nearest_interpolation_only_copies_pixels(images):
    out = Augment(rotation=30, zoom=0.3, interpolation="nearest")(images, 4)
    assert np.isin(out, images).all()
    smooth = Augment(rotation=30, zoom=0.3)(images, 4)
    assert not np.isin(smooth, images).all()


def test_zoom_keeps_shape_and_zooms(rng):
    images = rng.random((5, 12, 10, 3), dtype=np.float32)
    for zoom in ((0.5, 0.5), (2.0, 2.0), 0.3):
        out = Augment(zoom=zoom)(images, 0)
        assert out.shape == images.shape and out.dtype == np.float32
    # zooming in 2x on a smooth ramp halves its slope around the centre
    ramp = np.tile(np.arange(12, dtype=np.float32)[None, :, None, None], (1, 1, 12, 1))
    zoomed = Augment(zoom=(2, 2))(ramp, 0)
    np.testing.assert_allclose(np.diff(zoomed[0, 3:9, 6, 0]), 0.5, atol=1e-5)
    # zooming out with a constant fill shows the fill around a shrunken picture
    out = Augment(zoom=(0.5, 0.5), fill_mode="constant", fill_value=-7)(images + 1, 0)
    assert (out[:, 0] == -7).all() and (out[:, 6, 5] > 0).all()


def test_translation_moves_the_picture(rng):
    dot = np.zeros((200, 21, 21, 1), np.float32)
    dot[:, 10, 10] = 1
    moved = Augment(translation=0.2, fill_mode="constant")(dot, 3)
    rows = (moved[..., 0].sum(axis=2) * np.arange(21)).sum(axis=1) / moved.sum(axis=(1, 2, 3))
    assert np.abs(rows - 10).max() <= 0.2 * 21 + 1e-3 and np.std(rows) > 1


def test_contrast_keeps_each_image_channel_mean(images):
    out = Augment(contrast=0.5)(images, 2)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-5)
    ratio = out.std(axis=(1, 2)) / images.std(axis=(1, 2))
    assert ((ratio >= 0.5 - 1e-4) & (ratio <= 1.5 + 1e-4)).all() and np.ptp(ratio) > 0.1


def test_invert_with_value_range_is_an_involution(rng):
    scaled = rng.random((6, 5, 5, 3), dtype=np.float32)
    invert = Augment(invert=1.0, value_range=(0, 1))
    np.testing.assert_allclose(invert(scaled, 0), 1 - scaled, atol=1e-6)
    np.testing.assert_allclose(invert(invert(scaled, 0), 0), scaled, atol=1e-6)
    own = Augment(invert=1.0)(scaled, 0)                     # about each image's min and max
    np.testing.assert_allclose(own.min(axis=(1, 2, 3)), scaled.min(axis=(1, 2, 3)), atol=1e-6)


def test_deterministic_per_key(images):
    augment = Augment(**FULL)
    key = (7, 2, 31, 3)                                      # (seed, epoch, step, shard)
    first = augment(images, np.random.default_rng(key))
    np.testing.assert_array_equal(augment(images, np.random.default_rng(key)), first)
    np.testing.assert_array_equal(augment(images, key), first)
    assert not np.array_equal(augment(images, (7, 2, 31, 4)), first)
    assert first.shape == images.shape and first.dtype == np.float32
    assert np.isfinite(first).all()


def test_switching_one_operation_leaves_the_others_draws_alone(images):
    with_contrast = Augment(horizontal_flip=0.5, contrast=0.4)(images, 5)
    flips_only = Augment(horizontal_flip=0.5)(images, 5)
    flipped = (flips_only != images).any(axis=(1, 2, 3))
    assert ((with_contrast != images).any(axis=(1, 2, 3)) | ~flipped).all()
    np.testing.assert_allclose(with_contrast.mean(axis=(1, 2)), flips_only.mean(axis=(1, 2)),
                               atol=1e-5)


def test_bad_arguments_are_refused(images):
    with pytest.raises(ValueError, match="probability"):
        Augment(horizontal_flip=1.5)
    with pytest.raises(ValueError, match="zoom must stay > 0"):
        Augment(zoom=1.0)
    with pytest.raises(ValueError, match="float32"):
        Augment()(images.astype(np.float64), 0)


def test_from_names_switches_on_the_named_operations(images):
    augment = Augment.from_names(["hflip", "rotate", "invert"], invert=1.0)
    assert (augment.horizontal_flip, augment.rotation, augment.invert) == (0.5, (-15, 15), 1.0)
    assert augment.zoom == (1.0, 1.0) and augment.contrast == (1.0, 1.0)
    assert augment(images, 0).shape == images.shape
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        Augment.from_names(["blur"])
