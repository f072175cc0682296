"""Sequential: Keras shape arithmetic, naming, the gradient()/apply_gradients contract,
save/load, determinism and the messages bad input gets."""
import re

import numpy as np
import pytest

from cnnx import nn, optim


def issue_network():
    """The network from issue 3: 425,665 parameters on 350x350x3 inputs."""
    return nn.Sequential([
        nn.Conv2D(32, 5, strides=2, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(32, 3, strides=2, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(32, 2, strides=2, activation="relu"), nn.MaxPool2D(2, strides=1, padding="same"),
        nn.Flatten(), nn.Dense(128, activation="relu"), nn.Dense(1, activation="sigmoid"),
    ], input_shape=(350, 350, 3), seed=0)


def small_cnn(seed=0, dropout=0.25, batch_norm=False, classes=3):
    layers = [nn.Conv2D(4, 3, padding="same", activation="relu")]
    layers += [nn.BatchNormalization()] if batch_norm else []
    layers += [nn.MaxPool2D(2), nn.Conv2D(6, 3, strides=2, activation="tanh"), nn.Flatten(),
               nn.Dense(8, activation="relu", kernel_regularizer=nn.L2(1e-3)), nn.Dropout(dropout),
               nn.Dense(classes, activation="softmax")]
    return nn.Sequential(layers, input_shape=(9, 8, 2), seed=seed)


def toy_data(rng, n=40, classes=3):
    x = rng.normal(0, 1, (n, 9, 8, 2)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return x, y


def test_issue_network_has_425665_parameters():
    model = issue_network()
    assert model.count_params() == 425_665
    text = model.summary(print_fn=None)
    assert "Total params: 425,665" in text
    assert "conv2d_2 (Conv2D)" in text and "(None, 10, 10, 32)" in text
    assert "(None, 173, 173, 32)" in text and "(None, 3200)" in text
    shapes = [layer.output_shape for layer in model.layers]
    assert shapes == [(173, 173, 32), (86, 86, 32), (42, 42, 32), (21, 21, 32), (10, 10, 32),
                      (10, 10, 32), (3200,), (128,), (1,)]


def test_layer_names_and_flat_dicts_follow_keras():
    model = small_cnn(batch_norm=True)
    assert [layer.name for layer in model.layers] == [
        "conv2d", "batch_normalization", "max_pooling2d", "conv2d_1", "flatten", "dense",
        "dropout", "dense_1"]
    assert set(model.params) == {"conv2d/kernel", "conv2d/bias", "batch_normalization/gamma",
                                 "batch_normalization/beta", "conv2d_1/kernel", "conv2d_1/bias",
                                 "dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"}
    assert set(model.state) == {"batch_normalization/moving_mean",
                                "batch_normalization/moving_variance"}
    assert all(value.dtype == np.float32 for value in model.get_weights().values())
    text = model.summary(print_fn=None)
    assert "Non-trainable params: 8" in text


def test_gradient_sums_compose_over_shards(rng):
    model = small_cnn(dropout=0.0)
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy", ["accuracy"])
    x, y = toy_data(rng)
    whole = model.gradient(x, y, key=(0, 0, 0))
    parts = model.gradient(x[:15], y[:15]) + model.gradient(x[15:], y[15:])
    assert isinstance(whole, nn.GradientSum)
    assert parts.n_samples == whole.n_samples == 40
    assert parts.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)
    assert parts.n_correct == whole.n_correct
    assert set(whole.grads) == set(model.params)
    for name in whole.grads:
        np.testing.assert_allclose(parts.grads[name], whole.grads[name], rtol=1e-4, atol=1e-6)


def test_gradient_is_the_loss_sums_gradient(rng, monkeypatch):
    """Finite differences of loss_sum through the whole model, on the float64 op path."""
    model = small_cnn(dropout=0.0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    monkeypatch.setattr(model, "_as_input", lambda x, who: x)      # keep float64 inputs
    for layer in model.layers:
        for name, value in layer.params.items():
            layer.params[name] = value.astype(np.float64)
    x, y = toy_data(rng, n=8)
    x = x.astype(np.float64)
    result = model.gradient(x, y)
    for name, param in model.params.items():
        direction = rng.normal(0, 1, param.shape)
        start = param.copy()
        losses = []
        for sign in (1, -1):
            param[...] = start + sign * 1e-6 * direction
            losses.append(model.gradient(x, y).loss_sum)
        param[...] = start
        numeric = (losses[0] - losses[1]) / 2e-6
        analytic = float((result.grads[name] * direction).sum())
        assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-7), name


def test_fit_is_a_loop_over_gradient_and_apply_gradients(rng):
    x, y = toy_data(rng)
    fitted = small_cnn(seed=3, batch_norm=True)
    fitted.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy", ["accuracy"])
    fitted.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    manual = small_cnn(seed=3, batch_norm=True)
    manual.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy", ["accuracy"])
    for epoch in range(2):
        for step, begin in enumerate(range(0, len(x), 16)):
            result = manual.gradient(x[begin:begin + 16], y[begin:begin + 16],
                                     key=(epoch, step, 0))
            manual.apply_gradients(result.mean_grads(), result.state)
    for name, value in fitted.get_weights().items():
        np.testing.assert_array_equal(value, manual.get_weights()[name], err_msg=name)


def test_gradient_leaves_batchnorm_state_to_apply_gradients(rng):
    model = small_cnn(batch_norm=True)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = toy_data(rng)
    before = model.get_weights()
    result = model.gradient(x, y)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value, before[name])
    moving_mean = result.state["batch_normalization/moving_mean"]
    assert not np.array_equal(moving_mean, before["batch_normalization/moving_mean"])
    model.apply_gradients(result.mean_grads(), result.state)
    np.testing.assert_array_equal(model.state["batch_normalization/moving_mean"], moving_mean)


def test_apply_gradients_adds_the_regularizer_gradient(rng):
    model = small_cnn()
    model.compile(optim.SGD(0.5), "sparse_categorical_crossentropy")
    before = model.get_weights()
    zero = {k: np.zeros_like(v) for k, v in model.params.items()}
    model.apply_gradients(zero)
    # only dense/kernel has a regularizer: L2(1e-3) -> w -= 0.5 * 2e-3 * w
    np.testing.assert_allclose(model.params["dense/kernel"], before["dense/kernel"] * (1 - 1e-3),
                               rtol=1e-6)
    np.testing.assert_array_equal(model.params["conv2d/kernel"], before["conv2d/kernel"])
    assert model.regularization_loss() == pytest.approx(
        1e-3 * float((model.params["dense/kernel"].astype(np.float64) ** 2).sum()))


def test_same_seed_same_weights_bit_for_bit(rng):
    x, y = toy_data(rng)
    trained = []
    for _ in range(2):
        model = small_cnn(seed=11, dropout=0.5, batch_norm=True)
        model.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy", ["accuracy"])
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        trained.append(model.get_weights())
    for name in trained[0]:
        np.testing.assert_array_equal(trained[0][name], trained[1][name], err_msg=name)
    other = small_cnn(seed=12, dropout=0.5, batch_norm=True)
    assert not np.array_equal(other.params["conv2d/kernel"], trained[0]["conv2d/kernel"])


def test_same_weights_at_any_thread_count(rng):
    import cnnx
    x, y = toy_data(rng, n=64)
    trained = []
    for threads in (1, 2):
        model = small_cnn(seed=4, dropout=0.5, batch_norm=True)
        model.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy")
        with cnnx.num_threads(threads):
            model.fit(x, y, batch_size=32, epochs=2, verbose=0)
        trained.append(model.get_weights())
    for name in trained[0]:
        np.testing.assert_array_equal(trained[0][name], trained[1][name], err_msg=name)


def test_dropout_masks_depend_on_the_key(rng):
    model = small_cnn(dropout=0.5)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = toy_data(rng)
    first = model.gradient(x, y, key=(0, 0, 0)).loss_sum
    assert model.gradient(x, y, key=(0, 0, 0)).loss_sum == first
    assert model.gradient(x, y, key=(0, 1, 0)).loss_sum != first


def test_save_and_load_round_trip_continues_training_identically(rng, tmp_path):
    x, y = toy_data(rng)
    model = small_cnn(seed=5, batch_norm=True)
    model.compile(optim.Nadam(1e-2), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.npz")
    loaded = nn.load_model(tmp_path / "model.npz")
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    for key, value in model.optimizer.state_dict().items():
        np.testing.assert_array_equal(loaded.optimizer.state_dict()[key], value)
    model.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(loaded.get_weights()[name], value, err_msg=name)


def test_load_model_finds_the_file_save_named(rng, tmp_path):
    model = small_cnn(seed=3)
    model.save(tmp_path / "weights")                 # written as weights.npz, like numpy
    assert (tmp_path / "weights.npz").is_file()
    loaded = nn.load_model(tmp_path / "weights")
    x, _ = toy_data(rng, n=4)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_pickled_model_leaves_caches_behind_and_keeps_training(rng):
    """Dask pickles models to ship them to workers: weights go, forward caches do not."""
    import pickle
    x, y = toy_data(rng, n=256)
    model = small_cnn(batch_norm=True)
    model.compile(optim.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    weights_bytes = sum(v.nbytes for v in model.get_weights().values())
    payload = pickle.dumps(model)
    assert len(payload) < 3 * weights_bytes + 20_000       # the optimizer's m and v come too
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone.predict(x), model.predict(x))
    model.fit(x, y, batch_size=256, epochs=2, initial_epoch=1, verbose=0)
    clone.fit(x, y, batch_size=256, epochs=2, initial_epoch=1, verbose=0)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(clone.get_weights()[name], value, err_msg=name)


def test_pickled_layers_leave_their_gradients_behind(rng):
    """A worker's model copy moves between workers: the last backward's grads must not."""
    import pickle
    model = nn.Sequential([nn.Flatten(), nn.Dense(512, activation="relu"),
                           nn.Dense(2, activation="softmax")], input_shape=(16, 16, 1))
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = rng.standard_normal((8, 16, 16, 1)).astype(np.float32)
    fresh = len(pickle.dumps(model))
    model.gradient(x, np.arange(8) % 2)
    grads_bytes = sum(g.nbytes for layer in model.layers for g in layer.grads.values())
    assert grads_bytes > 500_000
    assert len(pickle.dumps(model)) < fresh + 10_000


def test_saved_file_has_no_pickled_objects(rng, tmp_path):
    model = small_cnn()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.save(tmp_path / "model")                       # ".npz" appended like numpy
    with np.load(tmp_path / "model.npz", allow_pickle=False) as archive:
        assert all(archive[key].dtype != object for key in archive.files)
        assert "architecture" in archive.files


def test_predict_and_evaluate(rng):
    x, y = toy_data(rng)
    model = small_cnn()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    probabilities = model.predict(x.astype(np.float64), batch_size=7)   # converted at the edge
    assert probabilities.shape == (40, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    loss, accuracy = model.evaluate(x, y, batch_size=9)
    expected = -np.log(probabilities[np.arange(40), y]).mean() + model.regularization_loss()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert accuracy == pytest.approx((probabilities.argmax(1) == y).mean())


def test_binary_model_with_validation_split(rng):
    x = rng.normal(0, 1, (60, 9, 8, 2)).astype(np.float32)
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    model = nn.Sequential([nn.Flatten(), nn.Dense(1, activation="sigmoid")], input_shape=(9, 8, 2))
    model.compile(optim.Adam(0.05), "binary_crossentropy", ["accuracy"])
    history = model.fit(x, y, batch_size=10, epochs=15, validation_split=0.25, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history.history["loss"]) == 15
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["accuracy"][-1] >= 0.95


# ------------------------------------------------------------------------------ bad input

def test_wrong_input_shape_names_the_layer_and_both_shapes(rng):
    model = small_cnn()
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"'conv2d' \(Conv2D\) expected input "
                                         r"\(None, 9, 8, 2\), got \(5, 8, 9, 2\)"):
        model.fit(np.zeros((5, 8, 9, 2)), np.zeros(5, int), verbose=0)
    with pytest.raises(ValueError, match=r"expected input \(None, 9, 8, 2\), got \(9, 8, 2\)"):
        model.predict(np.zeros((9, 8, 2)))


def test_dense_after_a_feature_map_asks_for_flatten():
    with pytest.raises(ValueError, match=r"Dense\(10\) expected a flat input .* "
                                         r"\(None, 6, 6, 4\); add Flatten\(\)"):
        nn.Sequential([nn.Conv2D(4, 3), nn.Dense(10)], input_shape=(8, 8, 1))


def test_labels_out_of_range_are_refused(rng):
    model = small_cnn()
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = toy_data(rng, n=4)
    with pytest.raises(ValueError, match=r"sequential.fit: labels must lie in \[0, 3\).*max 3"):
        model.fit(x, np.array([0, 1, 2, 3]), verbose=0)
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        model.fit(x, y[:3], verbose=0)


def test_nan_loss_stops_fit_with_epoch_and_step(rng, tmp_path):
    # conv + fused ReLU + max-pool in front: none of them may hide the NaN
    model = small_cnn(dropout=0.0)
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy")
    x, y = toy_data(rng)
    x[20, 4, 3, 1] = np.nan                          # in the second batch of 16
    logger = nn.CSVLogger(tmp_path / "log.csv")
    with pytest.raises(FloatingPointError, match="at epoch 0, step 1") as caught:
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[logger])
    assert (caught.value.epoch, caught.value.step) == (0, 1)     # for code, not only people
    assert logger._file is None, "fit must close its callbacks when training stops on an error"


@pytest.mark.parametrize("name, value", [("batch_size", 0), ("batch_size", 2.5), ("epochs", -1)])
def test_fit_refuses_bad_batch_size_and_epochs(rng, name, value):
    model = small_cnn()
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy")
    x, y = toy_data(rng, n=8)
    with pytest.raises(ValueError, match=f"fit: {name} must be a positive integer, got {value}"):
        model.fit(x, y, verbose=0, **{name: value})


def test_must_compile_before_fit(rng):
    x, y = toy_data(rng, n=4)
    with pytest.raises(RuntimeError, match="compile"):
        small_cnn().fit(x, y)


def test_set_weights_checks_keys_and_shapes():
    model = small_cnn()
    weights = model.get_weights()
    weights["dense/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"'dense/kernel' expected shape \(6, 8\), got \(2, 2\)"):
        model.set_weights(weights)
    del weights["dense/kernel"]
    with pytest.raises(ValueError, match=r"missing \['dense/kernel'\]"):
        model.set_weights(weights)


@pytest.mark.parametrize("call", ["predict", "evaluate"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_predict_and_evaluate_refuse_bad_batch_size_like_fit(rng, call, value):
    model = small_cnn()
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy", ["accuracy"])
    x, y = toy_data(rng, n=8)
    arguments = (x,) if call == "predict" else (x, y)
    with pytest.raises(ValueError, match=f"sequential.{call}: batch_size must be a positive "
                                         f"integer, got {value}"):
        getattr(model, call)(*arguments, batch_size=value)


def test_object_labels_get_a_type_error_naming_their_dtype(rng):
    model = small_cnn()
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy")
    x, _ = toy_data(rng, n=4)
    for labels in (np.array([0, 1, 2, 0], dtype=object), np.array(["cat", "dog", "cat", "ox"])):
        with pytest.raises(TypeError, match=f"sequential.fit: sparse_categorical_crossentropy "
                                            f"expects numeric labels .* dtype {labels.dtype}"):
            model.fit(x, labels, verbose=0)


@pytest.mark.parametrize("input_shape, who", [
    ((2**32, 2**32, 1), "its input_shape"),                   # 2**64 wraps int64 to 0
    ((2**16, 2**16, 1), "its input_shape"),
    ((2**15, 2**15, 1), None)])
def test_layer_outputs_too_large_for_the_kernels_are_refused(input_shape, who):
    layers = [nn.Flatten(), nn.Dense(2)]
    if who is None:                       # the input fits; the conv's output does not
        layers, who = [nn.Conv2D(4, 1), *layers], "layer 'conv2d' (Conv2D)"
    with pytest.raises(ValueError, match=rf"sequential: {re.escape(who)} has shape .* values "
                                         r"per sample; the kernels take at most 2\*\*31 - 1"):
        nn.Sequential(layers, input_shape=input_shape)


def test_flatten_counts_its_features_without_overflow():
    assert nn.Flatten().build((2**32, 2**32, 1), rng=None) == (2**64,)


def test_a_zero_sized_input_is_refused():
    with pytest.raises(ValueError, match=r"input_shape has shape \(None, 0, 4\); every "
                                         r"dimension must be at least 1"):
        nn.Sequential([nn.Flatten(), nn.Dense(2)], input_shape=(0, 4))


def test_model_and_loading_do_not_import_each_other():
    import ast
    import inspect
    from cnnx.nn import model as model_module
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(model_module)))
                if isinstance(node, ast.ImportFrom)}
    assert "cnnx.nn.serialization" not in imported
