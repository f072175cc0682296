"""Each layer's outputs and gradients against PyTorch with copied weights (only when torch is
installed; it is never a dependency).  cnnx is NHWC/HWIO, torch NCHW/OIHW."""
import numpy as np
import pytest

from cnnx import nn, optim

torch = pytest.importorskip("torch")
F = torch.nn.functional
torch.set_num_threads(1)

RTOL, ATOL = 1e-4, 1e-5


def nchw(x):
    return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def run_cnnx(layer, x, grad_output_seed=0):
    """Forward and backward in float32; loss = sum(y * w) with a fixed random w."""
    layer.name = layer.name or "layer"
    layer.input_shape = x.shape[1:]
    layer.output_shape = layer.build(x.shape[1:], np.random.default_rng(0))
    y = layer.forward(x, training=True, rng=np.random.default_rng(0))
    w = np.random.default_rng(grad_output_seed).normal(0, 1, y.shape).astype(np.float32)
    return y, w, layer.backward(w.copy())           # backward may overwrite its argument


def torch_padding(x_size, kernel, stride, padding):
    """TensorFlow 'same' padding as explicit (before, after) amounts."""
    if padding == "valid":
        return 0, 0
    out = -(-x_size // stride)
    total = max((out - 1) * stride + kernel - x_size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("filters, kernel, strides, padding, activation", [
    (4, 3, 1, "valid", "relu"), (5, 3, 2, "same", None), (3, (2, 3), 1, "same", "tanh"),
    (6, 5, 2, "valid", "sigmoid")])
def test_conv2d_matches_torch(rng, filters, kernel, strides, padding, activation):
    x = rng.normal(0, 1, (2, 9, 8, 3)).astype(np.float32)
    layer = nn.Conv2D(filters, kernel, strides=strides, padding=padding, activation=activation)
    layer_bias = rng.normal(0, 0.3, filters).astype(np.float32)
    layer.name = "conv"
    layer.input_shape = x.shape[1:]
    layer.output_shape = layer.build(x.shape[1:], np.random.default_rng(0))
    layer.params["bias"][...] = layer_bias
    y = layer.forward(x, training=True)
    w = rng.normal(0, 1, y.shape).astype(np.float32)
    grad_input = layer.backward(w.copy())

    kh, kw = layer.kernel_size
    top, bottom = torch_padding(9, kh, layer.strides[0], padding)
    left, right = torch_padding(8, kw, layer.strides[1], padding)
    tx = nchw(x)
    tk = torch.tensor(layer.params["kernel"].transpose(3, 2, 0, 1).copy(), requires_grad=True)
    tb = torch.tensor(layer_bias, requires_grad=True)
    ty = F.conv2d(F.pad(tx, (left, right, top, bottom)), tk, tb, stride=layer.strides)
    ty = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}.get(
        activation, lambda t: t)(ty)
    (ty * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(y, nhwc(ty), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_input, nhwc(tx.grad), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.grads["kernel"], tk.grad.numpy().transpose(2, 3, 1, 0),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.grads["bias"], tb.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind, pool, strides, padding", [
    ("max", 2, None, "valid"), ("max", 3, 2, "valid"), ("avg", 2, None, "valid"),
    ("avg", 3, 1, "valid")])
def test_pooling_matches_torch(rng, kind, pool, strides, padding):
    x = rng.normal(0, 1, (2, 7, 6, 3)).astype(np.float32)
    layer = (nn.MaxPool2D if kind == "max" else nn.AvgPool2D)(pool, strides, padding)
    y, w, grad_input = run_cnnx(layer, x)
    tx = nchw(x)
    pool_fn = F.max_pool2d if kind == "max" else F.avg_pool2d
    ty = pool_fn(tx, pool, stride=strides or pool)
    (ty * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(y, nhwc(ty), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_input, nhwc(tx.grad), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "sigmoid", "tanh", "softmax"])
def test_dense_matches_torch(rng, activation):
    x = rng.normal(0, 1, (5, 7)).astype(np.float32)
    layer = nn.Dense(4, activation=activation)
    y, w, grad_input = run_cnnx(layer, x)
    tx = torch.tensor(x, requires_grad=True)
    tk = torch.tensor(layer.params["kernel"], requires_grad=True)
    tb = torch.tensor(layer.params["bias"], requires_grad=True)
    ty = tx @ tk + tb
    ty = {"relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
          "sigmoid": torch.sigmoid, "tanh": torch.tanh,
          "softmax": lambda t: torch.softmax(t, -1)}.get(activation, lambda t: t)(ty)
    (ty * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_input, tx.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.grads["kernel"], tk.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.grads["bias"], tb.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (8, 5)])
def test_batch_normalization_matches_torch(rng, shape):
    x = rng.normal(2, 3, shape).astype(np.float32)
    layer = nn.BatchNormalization(momentum=0.9, epsilon=1e-3)
    y, w, grad_input = run_cnnx(layer, x)
    channels_first = len(shape) == 4
    tx = nchw(x) if channels_first else torch.tensor(x, requires_grad=True)
    bn = torch.nn.BatchNorm2d(shape[-1], eps=1e-3, momentum=0.1) if channels_first else \
        torch.nn.BatchNorm1d(shape[-1], eps=1e-3, momentum=0.1)
    bn.train()
    ty = bn(tx)
    tw = torch.tensor(w.transpose(0, 3, 1, 2) if channels_first else w)
    (ty * tw).sum().backward()
    as_nhwc = nhwc if channels_first else (lambda t: t.detach().numpy())
    np.testing.assert_allclose(y, as_nhwc(ty), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_input, as_nhwc(tx.grad), rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(layer.grads["gamma"], bn.weight.grad.numpy(), rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(layer.grads["beta"], bn.bias.grad.numpy(), rtol=RTOL, atol=1e-4)
    # torch's running variance is unbiased, Keras' (and ours) biased: compare the means only
    np.testing.assert_allclose(layer.state["moving_mean"], bn.running_mean.numpy(), rtol=RTOL,
                               atol=ATOL)


def test_cross_entropy_losses_match_torch(rng):
    logits = rng.normal(0, 3, (6, 5)).astype(np.float64)
    y = rng.integers(0, 5, 6)
    loss, grad = nn.SparseCategoricalCrossentropy().from_logits(logits, y)
    tz = torch.tensor(logits, requires_grad=True)
    tloss = F.cross_entropy(tz, torch.tensor(y), reduction="sum")
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-10)
    np.testing.assert_allclose(grad, tz.grad.numpy(), rtol=1e-10)
    z = rng.normal(0, 3, (6, 1))
    labels = rng.integers(0, 2, 6)
    loss, grad = nn.BinaryCrossentropy().from_logits(z, labels)
    tz = torch.tensor(z, requires_grad=True)
    tloss = F.binary_cross_entropy_with_logits(tz[:, 0], torch.tensor(labels, dtype=torch.float64),
                                               reduction="sum")
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-10)
    np.testing.assert_allclose(grad, tz.grad.numpy(), rtol=1e-10)


@pytest.mark.parametrize("ours, theirs", [
    (lambda: optim.SGD(0.05, momentum=0.9),
     lambda p: torch.optim.SGD(p, 0.05, momentum=0.9)),
    (lambda: optim.SGD(0.05, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, 0.05, momentum=0.9, nesterov=True)),
    (lambda: optim.Adam(0.01, epsilon=1e-8), lambda p: torch.optim.Adam(p, 0.01, eps=1e-8)),
    (lambda: optim.RMSprop(0.01, rho=0.9, epsilon=1e-8),
     lambda p: torch.optim.RMSprop(p, 0.01, alpha=0.9, eps=1e-8)),
    (lambda: optim.Adagrad(0.1, initial_accumulator_value=0.1, epsilon=1e-10),
     lambda p: torch.optim.Adagrad(p, 0.1, initial_accumulator_value=0.1, eps=1e-10)),
    (lambda: optim.Adadelta(1.0, rho=0.9, epsilon=1e-6),
     lambda p: torch.optim.Adadelta(p, 1.0, rho=0.9, eps=1e-6)),
])
def test_optimizers_match_torch(rng, ours, theirs):
    start = rng.normal(0, 1, 5)
    params = {"w": start.copy()}
    tw = torch.tensor(start.copy(), requires_grad=True)
    optimizer, torch_optimizer = ours(), theirs([tw])
    for _ in range(5):
        grad = rng.normal(0, 1, 5)
        optimizer.apply(params, {"w": grad})
        tw.grad = torch.tensor(grad)
        torch_optimizer.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-9, atol=1e-12)
