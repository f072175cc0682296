"""cnnx bench's memory-bound byte counts follow what the layers really keep: a one-byte window
tap for max-pools whose windows tile the input, a one-byte dropout mask, nothing for a ReLU
that the BatchNormalization before it applies."""
import pytest

from cnnx import architectures, bench, nn

BATCH = 8


def model_bytes(model):
    return {layer.name: bench.layer_bytes(layer, BATCH) for layer in model.layers}


def test_fused_relu_moves_nothing_and_batchnorm_moves_its_arrays():
    model = architectures.comics_bn_dropout((22, 21, 1))
    counts = model_bytes(model)
    relus = [layer for layer in model.layers if isinstance(layer, nn.ReLU)]
    assert relus and all(counts[layer.name] == (0, 0) for layer in relus)
    batchnorm = next(layer for layer in model.layers
                     if isinstance(layer, nn.BatchNormalization))
    size = BATCH * 4 * batchnorm.output_shape[0] * batchnorm.output_shape[1] \
        * batchnorm.output_shape[2]
    assert counts[batchnorm.name] == (2 * size, 3 * size)


@pytest.mark.parametrize("strides, index_bytes", [(None, 1), ((1, 1), 4)])
def test_max_pool_counts_its_index_at_its_own_width(strides, index_bytes):
    model = nn.Sequential([nn.MaxPool2D(2, strides=strides)], input_shape=(6, 8, 3))
    pool = model.layers[0]
    size_in = BATCH * 6 * 8 * 3 * 4
    outputs = BATCH * pool.output_shape[0] * pool.output_shape[1] * 3
    index = outputs * index_bytes
    assert bench.layer_bytes(pool, BATCH) == (size_in + 4 * outputs + index,
                                              4 * outputs + size_in + index)


def test_dropout_counts_a_one_byte_mask():
    model = nn.Sequential([nn.Dropout(0.5)], input_shape=(5, 7))
    size = BATCH * 5 * 7 * 4
    assert bench.layer_bytes(model.layers[0], BATCH) == (2 * size + size // 4,
                                                         2 * size + size // 4)


def test_a_max_pool_done_in_its_convolution_moves_nothing_forward():
    model = architectures.fashion()
    conv, pool = model.layers[0], model.layers[1]
    assert conv.max_pool is pool                   # Sequential fused the pair
    size_in = BATCH * 4 * 26 * 26 * 32
    outputs = BATCH * 13 * 13 * 32
    # backward: grad_output, grad_input, the one-byte taps and the pooled output (ReLU mask)
    assert bench.layer_bytes(pool, BATCH) == (0, 4 * outputs + size_in + outputs + 4 * outputs)
    unfused = nn.Sequential([nn.MaxPool2D(2)], input_shape=(26, 26, 32)).layers[0]
    assert bench.layer_bytes(unfused, BATCH)[0] == size_in + 4 * outputs + outputs
