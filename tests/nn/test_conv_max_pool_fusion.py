"""A Conv2D(relu) (stride 1) followed by a MaxPool2D whose windows tile its output: in
training, the Conv2D pools its own output band by band (Conv2D.max_pool, set by
pooling.fuse_relu_into_max_pool) and never keeps the full output. The same bits as the
pair apart (a whole step, any thread count, both ISAs), only for the pools a band can hold,
inference unchanged (feature maps), kept through pickling."""
import pickle

import numpy as np
import pytest
from reference import assert_same_step, bits, step_results

import cnnx
from cnnx import _kernels, architectures, nn, visualize

ISAS = ["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]

# the paper networks on odd images: a last band shorter than 16 rows, a last row and column
# no 'valid' window takes, clipped 'same' windows (glasses, small)
NETS = {"glasses": (13, 11, 3), "comics": (37, 35, 1), "fashion": (28, 28, 1),
        "small": (19, 21, 1)}


def pairs(model):
    return [(conv, pool) for conv, pool in zip(model.layers, model.layers[1:])
            if isinstance(conv, nn.Conv2D) and isinstance(pool, nn.MaxPool2D)]


def net(name, pooled_in_conv):
    model = getattr(architectures, name)(NETS[name])
    model.compile("adam")
    assert pairs(model) and all(conv.max_pool is pool for conv, pool in pairs(model))
    if not pooled_in_conv:                   # the ReLU mask stays in the pool's backward
        for conv, _ in pairs(model):
            conv.max_pool = None
    return model


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", sorted(NETS))
def test_pooling_in_the_conv_gives_the_unfused_bits_for_any_thread_count(name, isa, rng):
    x = rng.standard_normal((5, *NETS[name])).astype(np.float32) * 2 + 0.3
    x[1] = 0.0                                           # ties in every window
    y = rng.integers(0, 2, 5)
    _kernels.set_isa(isa)
    try:
        with cnnx.num_threads(1):
            expected = step_results(net(name, pooled_in_conv=False), x, y)
        for n_threads in (1, 2, 3):
            with cnnx.num_threads(n_threads):
                got = step_results(net(name, pooled_in_conv=True), x, y)
            assert_same_step(got, expected, (name, isa, n_threads))
    finally:
        _kernels.set_isa("auto")


def test_a_fused_conv_never_allocates_its_full_output_in_training(rng):
    model = net("comics", pooled_in_conv=True)
    x = rng.standard_normal((4, *NETS["comics"])).astype(np.float32)
    model.gradient(x, rng.integers(0, 2, 4))
    for conv, pool in pairs(model):
        buffers = conv.__dict__.get("_buffers", {})
        assert "output" not in buffers, conv.name
        pooled_shape = (4, *pool.output_shape)
        assert buffers["pooled"].shape == pooled_shape and buffers["taps"].dtype == np.uint8
        # the pool keeps no output or taps of its own either
        assert not {"output", "argmax"} & set(pool.__dict__.get("_buffers", {})), pool.name
        assert pool._argmax is buffers["taps"] and pool._relu_y is buffers["pooled"]
    bytes_kept = sum(b.nbytes for layer in model.layers
                     for b in layer.__dict__.get("_buffers", {}).values())
    unfused = net("comics", pooled_in_conv=False)
    unfused.gradient(x, rng.integers(0, 2, 4))
    bytes_unfused = sum(b.nbytes for layer in unfused.layers
                        for b in layer.__dict__.get("_buffers", {}).values())
    conv_output = 4 * 35 * 33 * 32 * 4                   # the first conv's output, float32
    assert bytes_unfused - bytes_kept >= conv_output


@pytest.mark.parametrize("layers", [
    lambda: [nn.Conv2D(4, 3, strides=2, activation="relu"), nn.MaxPool2D(2)],
    lambda: [nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(3, strides=2)],
    lambda: [nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(3)],     # 16 % 3: across bands
    lambda: [nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(5, padding="same")],
    lambda: [nn.Conv2D(4, 3), nn.MaxPool2D(2)],                          # no ReLU to fold
    lambda: [nn.Conv2D(4, 3, activation="relu"), nn.ReLU(), nn.MaxPool2D(2)],
], ids=["strided-conv", "overlapping", "pool-3", "same-pad-before", "linear", "relu-layer"])
def test_other_pairs_keep_the_unfused_path(layers, rng):
    model = nn.Sequential([*layers(), nn.Flatten(), nn.Dense(2)], input_shape=(26, 24, 1))
    model.compile("adam")
    conv = model.layers[0]
    assert conv.max_pool is None
    x = rng.standard_normal((2, 26, 24, 1)).astype(np.float32)
    model.gradient(x, [0, 1])
    assert conv._buffers["output"].shape == (2, *conv.output_shape)


def test_inference_and_a_foreign_input_still_see_the_conv_output(rng):
    model = net("fashion", pooled_in_conv=True)
    conv, pool = pairs(model)[0]
    x = rng.standard_normal((2, *NETS["fashion"])).astype(np.float32)
    z = conv.forward(x)                                    # inference: the conv's own output
    assert z.shape == (2, *conv.output_shape)
    maps = visualize.feature_maps(model, x[0])
    assert maps[0][2].shape == conv.output_shape and maps[1][2].shape == pool.output_shape
    pooled = conv.forward(x, training=True)                # training: already pooled
    assert pooled.shape == (2, *pool.output_shape)
    assert pool.forward(pooled, training=True) is pooled
    # any other array (the pair used by hand) is pooled as usual
    expected = nn.MaxPool2D(2).forward(z, training=True)
    np.testing.assert_array_equal(pool.forward(z, training=True), expected)


def test_pooling_in_the_conv_survives_pickling(rng):
    model = net("comics", pooled_in_conv=True)
    clone = pickle.loads(pickle.dumps(model))
    assert all(conv.max_pool is pool for conv, pool in pairs(clone))
    x = rng.standard_normal((3, *NETS["comics"])).astype(np.float32)
    y = rng.integers(0, 2, 3)
    expected = net("comics", pooled_in_conv=False).gradient(x, y, key=(0, 1, 0))
    got = clone.gradient(x, y, key=(0, 1, 0))
    for key, value in expected.grads.items():
        assert np.array_equal(bits(got.grads[key]), bits(value)), key
