"""BatchNorm's per-channel kernels with a fused ReLU: the activated affine pass and the
masked backward passes against the unfused kernels (bit for bit) and NumPy, on both ISAs."""
import numpy as np
import pytest

from cnnx import _kernels

SHAPES = [(1, 1), (7, 3), (513, 16), (5 * 512 + 7, 32), (1031, 17)]


def batchnorm_operands(rng, rows, channels):
    """x with far-from-zero channels, the forward's float32 mean and scale, beta, and an
    activation with both signs (some exact zeros, a NaN) in every channel."""
    x = (rng.standard_normal((rows, channels)) * 3 + 5).astype(np.float32)
    x.flat[::11] = 5.0                                 # a whole channel value at the mean
    x.flat[3 % x.size] = np.nan
    mean = x[np.isfinite(x).all(axis=1)].mean(axis=0).astype(np.float32) if rows > 1 else \
        np.full(channels, 5.0, np.float32)
    scale = rng.uniform(0.2, 2.0, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    beta[0] = 0.0                                      # (x - mean) * scale + 0: y = 0 exactly
    return x, mean, scale, beta


@pytest.mark.parametrize("rows, channels", SHAPES, ids=lambda v: str(v))
def test_activated_affine_is_relu_of_the_affine_bit_for_bit(rows, channels, isa, rng):
    x, mean, scale, beta = batchnorm_operands(rng, rows, channels)
    plain = _kernels.channel_affine(x, scale, beta, np.empty_like(x), a_shift=mean)
    expected = _kernels.relu_forward(plain, np.empty_like(plain))
    for n_threads in (1, 2, 3):
        got = _kernels.channel_affine(x, scale, beta, np.full_like(x, 7.0), a_shift=mean,
                                      relu=True, n_threads=n_threads)
        np.testing.assert_array_equal(got, expected)
        assert np.array_equal(np.signbit(got), np.signbit(expected))
    numpy = (x - mean) * scale + beta
    np.testing.assert_array_equal(expected, np.where(numpy > 0, numpy, 0) + np.where(
        np.isnan(numpy), np.nan, 0))


@pytest.mark.parametrize("rows, channels", SHAPES[1:], ids=lambda v: str(v))
def test_masked_backward_passes_equal_relu_backward_then_the_plain_passes(rows, channels, isa,
                                                                          rng):
    x, mean, scale, beta = batchnorm_operands(rng, rows, channels)
    y = _kernels.channel_affine(x, scale, beta, np.empty_like(x), a_shift=mean, relu=True)
    grad = rng.standard_normal((rows, channels)).astype(np.float32)
    masked = _kernels.relu_backward(y, grad.copy())               # the unfused ReLU layer
    assert (masked == 0).any() and (masked != 0).any()
    k, b_scale, c = (rng.standard_normal(channels).astype(np.float32) for _ in range(3))
    expected_sums = _kernels.channel_sums(masked, x, b_shift=mean)
    expected_affine = _kernels.channel_affine(masked, k, c, np.empty_like(x), b=x,
                                              b_scale=b_scale, b_shift=mean)
    mask = (mean, scale, beta)
    for n_threads in (1, 2, 3):
        sums = _kernels.channel_sums(grad, x, b_shift=mean, relu_mask=mask,
                                     n_threads=n_threads)
        for got, expected in zip(sums, expected_sums):
            np.testing.assert_array_equal(got, expected)
        affine = _kernels.channel_affine(grad, k, c, np.empty_like(x), b=x, b_scale=b_scale,
                                         b_shift=mean, relu_mask=mask, n_threads=n_threads)
        np.testing.assert_array_equal(affine, expected_affine)


def test_relu_options_refuse_the_wrong_form(rng):
    a = rng.standard_normal((4, 3)).astype(np.float32)
    vector = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"channel_affine: relu applies to the one-input form"):
        _kernels.channel_affine(a, vector, vector, np.empty_like(a), b=a, b_scale=vector,
                                relu=True)
    with pytest.raises(ValueError, match=r"channel_sums: relu_mask is computed from b; give b"):
        _kernels.channel_sums(a, relu_mask=(vector, vector, vector))
    with pytest.raises(ValueError, match=r"channel_affine: relu_mask must be \(shift, scale, "
                                         r"offset\), got 2 arrays"):
        _kernels.channel_affine(a, vector, vector, np.empty_like(a), b=a, b_scale=vector,
                                relu_mask=(vector, vector))
    with pytest.raises(ValueError, match=r"channel_sums: relu_mask scale must have shape "
                                         r"\(3\), got \(4,\)"):
        _kernels.channel_sums(a, a, relu_mask=(vector, np.ones(4, np.float32), vector))


def test_streamed_affine_pass_gives_the_same_bits(rng):
    """Outputs over 16 MB are computed in L1 scratch and streamed (AVX2): the same values as
    the portable pass, for every form (plain, relu, two inputs with a mask)."""
    rows, channels = 131072 + 37, 32                          # 16.8 MB
    x, mean, scale, beta = batchnorm_operands(rng, rows, channels)
    grad = rng.standard_normal((rows, channels)).astype(np.float32)
    k, b_scale, c = (rng.standard_normal(channels).astype(np.float32) for _ in range(3))
    forms = [dict(a=x, a_scale=scale, shift=beta, a_shift=mean),
             dict(a=x, a_scale=scale, shift=beta, a_shift=mean, relu=True),
             dict(a=grad, a_scale=k, shift=c, b=x, b_scale=b_scale, b_shift=mean,
                  relu_mask=(mean, scale, beta))]
    results = {}
    for isa in (["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]):
        _kernels.set_isa(isa)
        try:
            results[isa] = [_kernels.channel_affine(out=np.full_like(x, 7.0), n_threads=t, **f)
                            for f in forms for t in (1, 2)]
        finally:
            _kernels.set_isa("auto")
    for got in results.values():
        for streamed, portable in zip(got, results["generic"]):
            np.testing.assert_array_equal(streamed, portable)
