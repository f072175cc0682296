"""A layer with activation="relu" followed by MaxPool2D: the pool's backward applies the ReLU
backward (each routed gradient times (y > 0)) and the layer before skips its own pass. The
same bits as the two apart (any thread count, both ISAs), only for those pairs, saved
configurations unchanged, kept through pickling."""
import pickle

import numpy as np
import pytest
from reference import assert_same_step, bits, numerical_gradient, step_results

import cnnx
from cnnx import _kernels, architectures, nn
from cnnx.nn.pooling import fuse_relu_into_max_pool

ISAS = ["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]

# the paper networks on small odd images (clipped 'same' windows, a last row no window takes)
NETS = {"glasses": ((13, 11, 3), 1), "comics": ((22, 21, 1), 2), "fashion": ((15, 14, 1), 2)}


def relu_pool_pairs(model):
    return [(layer, pool) for layer, pool in zip(model.layers, model.layers[1:])
            if isinstance(pool, nn.MaxPool2D)]


def paper_net(name, fused):
    """The paper network as Sequential builds it (fused), or with its pairs taken apart again
    (the reference: the conv's own ReLU backward, a plain max-pool backward)."""
    input_shape, n_pairs = NETS[name]
    model = getattr(architectures, name)(input_shape)
    model.compile("adam")
    pairs = relu_pool_pairs(model)
    assert len(pairs) == n_pairs
    assert all(conv.relu_backward_by_next and pool.masks_relu for conv, pool in pairs)
    if not fused:
        for conv, pool in pairs:
            conv.relu_backward_by_next = pool.masks_relu = False
    return model


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", sorted(NETS))
def test_fused_paper_net_gives_the_unfused_bits_for_any_thread_count(name, isa, rng):
    input_shape, _ = NETS[name]
    x = rng.standard_normal((5, *input_shape)).astype(np.float32) * 2 + 0.5
    y = rng.integers(0, 2, 5)
    _kernels.set_isa(isa)
    try:
        with cnnx.num_threads(1):
            expected = step_results(paper_net(name, fused=False), x, y)
        for n_threads in (1, 2, 3):
            with cnnx.num_threads(n_threads):
                got = step_results(paper_net(name, fused=True), x, y)
            assert_same_step(got, expected, (name, isa, n_threads))
    finally:
        _kernels.set_isa("auto")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool, strides, padding, activation_layer", [
    (2, 2, "valid", False), (2, 2, "same", False), (3, 2, "same", False),
    (3, 1, "valid", False), (2, 2, "same", True)],
    ids=["tiling", "tiling-same", "overlapping", "overlapping-stride-1", "relu-layer"])
def test_fused_pair_gives_the_unfused_bits_on_edge_values(pool, strides, padding,
                                                          activation_layer, dtype, rng):
    """Conv2D(relu) (or Conv2D and a ReLU layer) and a MaxPool2D on their own, with windows
    whose max is 0 and a gradient with NaN, infinities and negatives (grad * 0 is -0)."""
    def pair(fused):
        layers = ([nn.Conv2D(6, 3, padding="same"), nn.ReLU()] if activation_layer
                  else [nn.Conv2D(6, 3, padding="same", activation="relu")])
        layers.append(nn.MaxPool2D(pool, strides, padding))
        model = nn.Sequential(layers, input_shape=(9, 8, 2))
        relu_layer, max_pool = model.layers[-2:]
        assert relu_layer.relu_backward_by_next and max_pool.masks_relu
        if not fused:
            relu_layer.relu_backward_by_next = max_pool.masks_relu = False
        return model

    x = rng.standard_normal((3, 9, 8, 2)).astype(dtype)
    x[0] = -np.abs(x[0])                                  # many zero ReLU outputs
    results = []
    for fused in (False, True):
        model = pair(fused)
        conv = model.layers[0]
        conv.need_input_grad = True                      # the input gradient too
        conv.params = {k: v.astype(dtype) for k, v in conv.params.items()}
        pooled = x
        for layer in model.layers:
            pooled = layer.forward(pooled, training=True)
        assert (pooled == 0).any() and (pooled > 0).any()
        if not results:
            grad_output = rng.standard_normal(pooled.shape).astype(dtype)
            flat = grad_output.reshape(-1)
            flat[::5] = -np.abs(flat[::5])
            flat[::17], flat[7::19] = np.nan, np.inf
        grad = grad_output.copy()
        with np.errstate(invalid="ignore"):                 # inf * 0
            for layer in reversed(model.layers):
                grad = layer.backward(grad)
        results.append(({k: v.copy() for k, v in model.layers[0].grads.items()}, grad.copy()))
    (expected_grads, expected_input_grad), (grads, input_grad) = results
    assert expected_grads["kernel"].dtype == dtype
    for key, value in expected_grads.items():
        assert np.array_equal(bits(grads[key]), bits(value)), key
    assert np.array_equal(bits(input_grad), bits(expected_input_grad))


def test_fused_pair_gradients_match_finite_differences_in_float64(rng):
    conv, pool = nn.Conv2D(3, 3, activation="relu"), nn.MaxPool2D(2, padding="same")
    assert pool.take_relu_backward_of(conv)
    conv.build((7, 6, 2), rng)
    conv.params = {k: rng.normal(0, 0.5, v.shape) for k, v in conv.params.items()}
    x = rng.normal(0, 1, (2, 7, 6, 2))
    weights = rng.normal(0, 1, (2, 3, 2, 3))                  # loss = sum(pool(conv(x)) * w)

    def loss():
        return float((pool.forward(conv.forward(x, training=True), training=True)
                      * weights).sum())

    pooled = pool.forward(conv.forward(x, training=True), training=True)
    assert pooled.dtype == np.float64 and (pooled == 0).mean() > 0.1     # the mask matters
    conv.backward(pool.backward(weights.copy()))
    for name, param in conv.params.items():
        np.testing.assert_allclose(conv.grads[name].reshape(-1),
                                   numerical_gradient(loss, param, range(param.size)),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("layers", [
    lambda: [nn.Conv2D(2, 3), nn.MaxPool2D(2)],                                # no activation
    lambda: [nn.Conv2D(2, 3, activation="tanh"), nn.MaxPool2D(2)],
    lambda: [nn.Conv2D(2, 3, activation="relu"), nn.Dropout(0.5), nn.MaxPool2D(2)],
    lambda: [nn.Conv2D(2, 3, activation="relu"), nn.AvgPool2D(2)],
    lambda: [nn.Conv2D(2, 3), nn.BatchNormalization(), nn.ReLU(), nn.MaxPool2D(2)],
    lambda: [nn.Conv2D(2, 3, activation="relu"), nn.Conv2D(2, 1), nn.MaxPool2D(2)],
], ids=["linear", "tanh", "dropout-between", "avg-pool", "batchnorm-relu", "conv-between"])
def test_only_a_relu_right_before_a_max_pool_is_fused(layers):
    model = nn.Sequential([*layers(), nn.Flatten(), nn.Dense(2)], input_shape=(8, 8, 1))
    assert not any(getattr(layer, "relu_backward_by_next", False) for layer in model.layers)
    assert not any(getattr(layer, "masks_relu", False) for layer in model.layers)
    assert fuse_relu_into_max_pool(model.layers) == 0
    pool = nn.MaxPool2D(2)
    assert not pool.take_relu_backward_of(None) and not pool.masks_relu


def test_fused_model_survives_pickling_and_keeps_its_config(rng):
    fused, plain = paper_net("comics", fused=True), paper_net("comics", fused=False)
    assert [layer.get_config() for layer in fused.layers] == \
        [layer.get_config() for layer in plain.layers]      # fusion is not configuration
    clone = pickle.loads(pickle.dumps(fused))
    assert all(conv.relu_backward_by_next and pool.masks_relu
               for conv, pool in relu_pool_pairs(clone))
    x = rng.standard_normal((3, 22, 21, 1)).astype(np.float32)
    y = rng.integers(0, 2, 3)
    expected = plain.gradient(x, y, key=(0, 1, 0))
    got = clone.gradient(x, y, key=(0, 1, 0))
    for key, value in expected.grads.items():
        assert np.array_equal(bits(got.grads[key]), bits(value)), key
    rebuilt = nn.model_from_config(fused.get_config())       # fused again when rebuilt
    assert all(conv.relu_backward_by_next and pool.masks_relu
               for conv, pool in relu_pool_pairs(rebuilt))


def test_relu_layer_skips_its_pass_when_the_pool_masks(rng):
    conv, pool = nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(2)
    assert pool.take_relu_backward_of(conv)
    conv.build((6, 6, 2), rng)
    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    pooled = pool.forward(conv.forward(x, training=True), training=True)
    grad = rng.standard_normal(pooled.shape).astype(np.float32)
    masked = pool.backward(grad)
    conv_y = conv._y
    assert np.array_equal(bits(conv._activation_backward(masked.copy())), bits(masked))
    assert np.array_equal(bits(masked), bits(masked * (conv_y > 0)))


def test_a_fused_pool_refuses_a_backward_without_its_training_forward(rng):
    conv, pool = nn.Conv2D(2, 3, activation="relu"), nn.MaxPool2D(2)
    assert pool.take_relu_backward_of(conv)
    conv.build((6, 6, 1), rng)
    pool.forward(conv.forward(rng.standard_normal((1, 6, 6, 1)).astype(np.float32)))
    pool._argmax = np.zeros((1, 2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"needs its training forward's output"):
        pool.backward(np.ones((1, 2, 2, 2), np.float32))


def test_bench_counts_the_output_a_masking_pool_reads_back():
    from cnnx import bench
    fused, plain = paper_net("comics", fused=True), paper_net("comics", fused=False)
    pool_fused, pool_plain = fused.layers[1], plain.layers[1]
    assert pool_fused.masks_relu and not pool_plain.masks_relu
    outputs_bytes = 8 * 4 * int(np.prod(pool_fused.output_shape))
    forward, backward = bench.layer_bytes(pool_fused, 8)
    assert (forward, backward - outputs_bytes) == bench.layer_bytes(pool_plain, 8)
    assert bench.layer_bytes(fused.layers[0], 8) == (0, 0)      # a conv stays compute-bound
