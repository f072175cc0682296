"""Stratified, deterministic splits."""
import numpy as np
import pytest

from cnnx import data


@pytest.fixture
def labels(rng):
    return rng.permutation(np.repeat([0, 1, 2], [500, 300, 100]))


def test_split_is_a_partition(labels):
    train, val, test = data.stratified_split(labels, 0.7, 0.2, 0.1, seed=3)
    together = np.concatenate([train, val, test])
    np.testing.assert_array_equal(np.sort(together), np.arange(len(labels)))
    assert (len(train), len(val), len(test)) == (630, 180, 90)


def test_split_keeps_class_proportions(labels):
    for part, fraction in zip(data.stratified_split(labels, 0.7, 0.2, 0.1, seed=3),
                              (0.7, 0.2, 0.1)):
        counts = np.bincount(labels[part], minlength=3)
        np.testing.assert_allclose(counts, fraction * np.array([500, 300, 100]), atol=1)


def test_split_is_deterministic_per_seed(labels):
    first = data.stratified_split(labels, 0.6, 0.2, 0.2, seed=7)
    again = data.stratified_split(labels.copy(), 0.6, 0.2, 0.2, seed=7)
    other = data.stratified_split(labels, 0.6, 0.2, 0.2, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_partial_split_leaves_the_rest_out(labels):
    train, val, test = data.stratified_split(labels, 0.1, 0.05, 0.0)
    assert (len(train), len(val), len(test)) == (90, 45, 0)


def test_split_rejects_fractions_over_one(labels):
    with pytest.raises(ValueError, match="sum to at most 1"):
        data.stratified_split(labels, 0.8, 0.2, 0.1)


def test_dataset_split_matches_labels(tmp_path, rng):
    y = np.repeat([0, 1], [30, 10])
    data.ingest_arrays(rng.integers(0, 256, (40, 2, 2, 1), dtype=np.uint8), y,
                       tmp_path / "s.zarr", chunk_size=8)
    ds = data.open_dataset(tmp_path / "s.zarr")
    train, val, test = ds.split(0.5, 0.25, 0.25, seed=1)
    assert np.bincount(y[val]).tolist() == [8, 2]    # round(7.5) = 8 (to even), round(2.5) = 2
    for a, b in zip((train, val, test), data.stratified_split(y, 0.5, 0.25, 0.25, seed=1)):
        np.testing.assert_array_equal(a, b)
