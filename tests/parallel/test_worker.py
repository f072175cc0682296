"""The pure pieces: keyed batches, the chunk cache, bfloat16, the plan, checkpoints."""
import os

import numpy as np
import pytest

from cnnx import data
from cnnx.parallel import checkpoint, plan, wire, worker


def spec(store, indices, augment=None, cache_bytes=2**20):
    return {"store": store.store, "opener": data.open_dataset, "indices": np.asarray(indices),
            "normalize": "standardize", "augment": augment, "seed": 0,
            "cache_bytes": cache_bytes}


def test_augmented_batches_are_a_function_of_the_key(store):
    augment = data.Augment(horizontal_flip=0.5, translation=0.2)
    first, labels = worker.prepare_batch(spec(store, range(16), augment), (0, 1, 2))
    again, _ = worker.prepare_batch(spec(store, range(16), augment), (0, 1, 2))
    other, _ = worker.prepare_batch(spec(store, range(16), augment), (0, 1, 3))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(labels, store.read(np.arange(16))[1])


def test_chunk_cache_is_bounded_and_serves_repeats(store):
    worker.clear_cache()
    one_chunk = store.chunk_size * int(np.prod(store.image_shape))
    worker.load_batch(spec(store, range(48), cache_bytes=2 * one_chunk))   # chunks 0, 1, 2
    info = worker.cache_info()
    assert info["misses"] == 3 and info["chunks"] == 2 and info["bytes"] <= 2 * one_chunk
    worker.load_batch(spec(store, [40, 41], cache_bytes=2 * one_chunk))   # chunk 2: cached
    assert worker.cache_info()["hits"] == 1


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3, np.inf, np.nan, 3.4e38], np.float32)
    back = wire.from_bfloat16(wire.to_bfloat16(x))
    np.testing.assert_array_equal(back[:2], [1.0, 1.0])               # tie -> even
    assert back[2] == np.float32(1.015625)                            # tie -> even (up)
    assert abs(back[3] - x[3]) <= abs(x[3]) * 2**-8
    assert np.isinf(back[4]) and np.isnan(back[5])
    assert wire.nbytes(wire.encode({"a": x}, "bfloat16")) == x.nbytes // 2


def test_dask_sizes_wire_payloads_exactly():
    # dask.sizeof samples 10 entries of a longer dict and sees into no dataclass; Dask's
    # memory accounting and transfer counters need the real size of weights and gradients
    from dask.sizeof import sizeof

    from cnnx.nn.gradient_sum import GradientSum

    arrays = {f"layer{i}/bias": np.zeros(4, np.float32) for i in range(11)}
    arrays["dense/kernel"] = np.zeros((1000, 1000), np.float32)
    for wire_dtype in ("float32", "bfloat16"):
        encoded = wire.encode(arrays, wire_dtype)
        payload = wire.nbytes(encoded)
        for _ in range(20):           # a sampled estimate would miss or double the big array
            assert payload <= sizeof(encoded) <= payload + 4096
        total = GradientSum(grads=encoded, n_samples=8, loss_sum=1.0,
                            state={"bn/moving_mean": np.zeros(1000, np.float32)})
        assert payload + 4000 <= sizeof(total) <= payload + 4000 + 8192


def test_plan_is_disjoint_chunk_local_and_keyed():
    owned = plan.shard_indices(np.arange(100), chunk_size=10, n_shards=3)
    assert sorted(np.concatenate(owned)) == list(range(100))
    assert all(set((o // 10) % 3) == {g} for g, o in enumerate(owned))
    epoch0 = plan.epoch_plan(owned, seed=0, epoch=0, shard_batch=5)
    assert epoch0.shape == (min(len(o) for o in owned) // 5, 3, 5)
    np.testing.assert_array_equal(epoch0, plan.epoch_plan(owned, 0, 0, 5))
    assert not np.array_equal(epoch0, plan.epoch_plan(owned, 0, 1, 5))
    assert plan.tree_pairs(5) == [[(0, 1), (2, 3), (4,)], [(0, 1), (2,)], [(0, 1)]]
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by shards=3"):
        plan.per_shard_batch(10, 3)


def test_checkpoint_is_atomic_and_pickle_free(tmp_path):
    weights = {"dense/kernel": np.ones((2, 3), np.float32)}
    checkpoint.save_checkpoint(tmp_path, weights, {"step": np.array(3)}, {"epoch": 1, "step": 2})
    loaded_weights, optimizer_state, meta = checkpoint.load_checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded_weights["dense/kernel"], weights["dense/kernel"])
    assert optimizer_state["step"] == 3 and meta == {"epoch": 1, "step": 2}
    assert os.listdir(tmp_path) == [checkpoint.FILENAME]             # no temporary left over
    with pytest.raises(TypeError):                                    # unpicklable meta: old file stays
        checkpoint.save_checkpoint(tmp_path, weights, {}, {"epoch": object()})
    assert checkpoint.load_checkpoint(tmp_path)[2]["epoch"] == 1
    assert os.listdir(tmp_path) == [checkpoint.FILENAME]
    assert checkpoint.load_checkpoint(tmp_path / "none") is None


def test_local_sgd_steps_on_the_regularised_objective(store):
    # EASGD/ADAG workers must minimise what fit minimises: mean loss + L1/L2 penalties
    from cnnx import nn, optim

    def regularised_model():
        model = nn.Sequential([nn.Flatten(),
                               nn.Dense(2, activation="softmax", kernel_regularizer=nn.L2(0.5))],
                              input_shape=store.image_shape, seed=0)
        model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy")
        return model

    specs = [spec(store, range(0, 16)), spec(store, range(16, 32))]
    keys = [(0, 0, 0), (0, 1, 0)]
    start = regularised_model().get_weights()
    weights = worker.local_sgd(regularised_model(), wire.encode(start), specs, keys,
                               learning_rate=0.1)[0]
    expected = regularised_model()                  # the same steps through Sequential
    for batch_spec, key in zip(specs, keys):
        x, y = worker.prepare_batch(batch_spec, key)
        result = expected.gradient(x, y, key=key)
        expected.apply_gradients(result.mean_grads(), result.state)
    for name, value in wire.decode(weights).items():
        np.testing.assert_allclose(value, expected.get_weights()[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_workers_get_the_model_without_the_optimizer_state(rng):
    # the driver steps; Adam's two moments would triple every model copy Dask moves
    import pickle

    from cnnx import nn
    from cnnx.parallel.transport import worker_copy

    model = nn.Sequential([nn.Flatten(), nn.Dense(512, activation="relu"),
                           nn.Dense(2, activation="softmax")], input_shape=(16, 16, 1))
    model.compile("adam", "sparse_categorical_crossentropy")
    x = rng.standard_normal((8, 16, 16, 1)).astype(np.float32)
    model.apply_gradients(model.gradient(x, np.arange(8) % 2).mean_grads())
    weights = sum(a.nbytes for a in model.get_weights().values())
    assert len(pickle.dumps(model)) > 2.5 * weights          # the moments are there
    shipped = worker_copy(model)
    assert len(pickle.dumps(shipped)) < weights + 10_000
    assert model.optimizer is not None                       # the driver keeps its own
    np.testing.assert_array_equal(shipped.predict(x), model.predict(x))


def factored_model():
    from cnnx import nn, optim

    model = nn.Sequential([nn.Flatten(), nn.Dense(64, activation="relu"),
                           nn.Dense(2, activation="softmax")], input_shape=(16, 16, 1))
    model.compile(optim.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def test_dense_keeping_factors_skips_only_the_kernel_gemm_and_changes_no_bit(rng):
    # with kernel_grad_as_factors the layer leaves grads["kernel"] unformed and keeps
    # (x, grad_z); every other gradient, and the factors multiplied out, are the same bits
    from cnnx.parallel import factors

    x = rng.standard_normal((8, 16, 16, 1)).astype(np.float32)
    y = np.arange(8) % 2
    plain, keeping = factored_model(), factored_model()
    keeping.layers[1].kernel_grad_as_factors = True
    expected, result = plain.gradient(x, y), keeping.gradient(x, y)
    assert result.grads["dense/kernel"] is None
    assert expected.grads.keys() == result.grads.keys()
    for name in expected.grads:
        if name != "dense/kernel":
            np.testing.assert_array_equal(result.grads[name], expected.grads[name], err_msg=name)
    kept = factors.from_layer(keeping.layers[1])
    np.testing.assert_array_equal(kept.materialise(), expected.grads["dense/kernel"])
    np.testing.assert_array_equal(kept.materialise(out=np.empty((256, 64), np.float32)),
                                  expected.grads["dense/kernel"])
    keeping.forward(x)                                   # the next forward drops them
    assert keeping.layers[1].kernel_factors is None


def test_dense_kernel_gradient_as_factors_is_exact_and_smaller(rng):
    # one shard's factors multiply out to the layer's own kernel gradient, bit for bit; sums
    # stack the factors while that is smaller, and multiply out once it is not
    from cnnx.parallel import factors

    model = factored_model()
    x = rng.standard_normal((8, 16, 16, 1)).astype(np.float32)
    result = model.gradient(x, np.arange(8) % 2)
    model.layers[1].kernel_grad_as_factors = True
    model.gradient(x, np.arange(8) % 2)
    captured = factors.from_layer(model.layers[1])
    np.testing.assert_array_equal(captured.materialise(), result.grads["dense/kernel"])
    assert captured.nbytes == 8 * (256 + 64) * 4 < result.grads["dense/kernel"].nbytes
    twice = captured + captured                    # 16 rows: still smaller, stacked
    assert isinstance(twice, factors.KernelFactors) and len(twice.inputs) == 16
    np.testing.assert_allclose(twice.materialise(), 2 * result.grads["dense/kernel"],
                               rtol=1e-6, atol=1e-7)
    many = twice + twice + twice + twice           # 64 rows: no longer smaller, multiplied out
    assert isinstance(many, np.ndarray)
    np.testing.assert_allclose(many, 8 * result.grads["dense/kernel"], rtol=1e-5, atol=1e-6)
    assert not factors.smaller_as_factors(64, 256, 64)
    # the glasses net's first Dense kernel at 32 rows: 6.6 MB instead of 26 MB
    assert 32 * (51200 + 128) * 4 / 1e6 == pytest.approx(6.57, abs=0.01)
    assert factors.smaller_as_factors(32, 51200, 128)


def test_replica_sends_factors_only_where_they_are_smaller(rng):
    # the replica asks its Dense layers for factors per task: 8 rows are smaller than the
    # 256x64 kernel, 64 rows are not (then the layer forms the kernel gradient itself)
    from cnnx.parallel import factors, replica

    held = replica._Replica(factored_model(), 0)
    assert held.factored == [held.model.layers[1]]
    for rows, factored in ((8, True), (64, False)):
        x = rng.standard_normal((rows, 16, 16, 1)).astype(np.float32)
        result = held.gradient(x, np.arange(rows) % 2, (0, 0, 0), "float32")
        kernel = result.grads["dense/kernel"]
        assert isinstance(kernel, factors.KernelFactors) == factored
        expected = factored_model().gradient(x, np.arange(rows) % 2).grads["dense/kernel"]
        np.testing.assert_array_equal(factors.materialised(kernel), expected)
    bfloat16 = held.gradient(x[:8], np.arange(8) % 2, (0, 0, 0), "bfloat16")
    assert isinstance(bfloat16.grads["dense/kernel"], np.ndarray)


def test_the_pulled_replica_state_is_sized_exactly(rng):
    # Dask samples 10 entries of a plain dict: Adam's 13-entry state was weighed anywhere in
    # 12.8-18.3 KB, and the bytes counted between workers jumped with it
    from dask.sizeof import sizeof

    from cnnx import optim
    from cnnx.parallel import replica

    model = factored_model()
    model.compile(optim.Adam(1e-3), "sparse_categorical_crossentropy")
    model.train_step(rng.standard_normal((8, 16, 16, 1)).astype(np.float32), np.arange(8) % 2)
    state = replica._state(model)
    sizes = {sizeof(state) for _ in range(20)}
    assert len(sizes) == 1
    assert 0 < sizes.pop() - wire.nbytes(state[0]) - wire.nbytes(state[1]) < 4096
