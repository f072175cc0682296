"""sgemm and column sums against the naive reference, both micro-kernels, any thread count."""
import numpy as np
import pytest

from cnnx import _kernels
import reference

SHAPES = [(1, 1, 1), (7, 6, 5), (6, 16, 1), (13, 37, 30), (100, 17, 27), (97, 33, 260)]


def operands(rng, m, n, k, transpose_a, transpose_b):
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_sgemm_matches_reference(shape, transpose_a, transpose_b, isa, rng):
    m, n, k = shape
    a, b = operands(rng, m, n, k, transpose_a, transpose_b)
    bias = rng.standard_normal(n).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32)
    _kernels.sgemm(a, b, c, bias, relu=True, transpose_a=transpose_a,
                   transpose_b=transpose_b, n_threads=2)
    expected = reference.sgemm(a.T if transpose_a else a, b.T if transpose_b else b, bias, True)
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("shape", [(200, 40, 300), (1, 300, 700), (500, 16, 9)])
def test_sgemm_without_epilogue_matches_numpy(shape, isa, rng):
    m, n, k = shape
    a, b = operands(rng, m, n, k, False, False)
    c = _kernels.sgemm(a, b, np.empty((m, n), np.float32), n_threads=2)
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


# (301, 290, 530): per-tile path; (500, 1100, 300): large path with B packed once, shared
@pytest.mark.parametrize("shape", [(301, 290, 530), (500, 1100, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("transpose_a", [False, True])
def test_sgemm_is_bit_identical_for_any_thread_count(shape, transpose_a, isa, rng):
    m, n, k = shape
    a, b = operands(rng, m, n, k, transpose_a, False)
    bias = rng.standard_normal(n).astype(np.float32)
    results = [_kernels.sgemm(a, b, np.empty((m, n), np.float32), bias, True,
                              transpose_a, n_threads=t) for t in (1, 2, 3)]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])
    expected = np.maximum((a.T if transpose_a else a).astype(np.float64) @ b + bias, 0)
    np.testing.assert_allclose(results[0], expected, rtol=1e-4, atol=1e-4)


def test_column_sums_match_numpy_and_ignore_thread_count(rng):
    a = rng.standard_normal((333, 300)).astype(np.float32)
    sums = [_kernels.column_sums(a, np.empty(300, np.float32), n_threads=t) for t in (1, 2, 3)]
    np.testing.assert_allclose(sums[0], a.astype(np.float64).sum(axis=0), rtol=1e-4, atol=1e-4)
    assert np.array_equal(sums[0], sums[1]) and np.array_equal(sums[0], sums[2])


def test_sgemm_rejects_wrong_dtype():
    a = np.ones((3, 4))
    with pytest.raises(TypeError, match=r"sgemm: a must be float32, got float64"):
        _kernels.sgemm(a, np.ones((4, 2), np.float32), np.empty((3, 2), np.float32))


def test_sgemm_rejects_non_contiguous_input():
    a = np.ones((4, 3), np.float32).T
    with pytest.raises(ValueError, match=r"sgemm: a must be C-contiguous"):
        _kernels.sgemm(a, np.ones((4, 2), np.float32), np.empty((3, 2), np.float32))


def test_sgemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"op\(a\) is 3x4 but op\(b\) is 5x2"):
        _kernels.sgemm(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32),
                       np.empty((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"sgemm: c must have shape \(3, 2\), got \(2, 3\)"):
        _kernels.sgemm(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32),
                       np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"sgemm: bias must have shape \(2\), got \(3,\)"):
        _kernels.sgemm(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32),
                       np.empty((3, 2), np.float32), np.ones(3, np.float32))


def test_sgemm_rejects_empty_arrays():
    with pytest.raises(ValueError, match=r"sgemm: a is empty \(shape \(0, 4\)\)"):
        _kernels.sgemm(np.ones((0, 4), np.float32), np.ones((4, 2), np.float32),
                       np.empty((0, 2), np.float32))


def test_sgemm_rejects_bad_thread_count():
    with pytest.raises(ValueError, match=r"sgemm: n_threads must be a positive integer, got 0"):
        _kernels.sgemm(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32),
                       np.empty((3, 2), np.float32), n_threads=0)
