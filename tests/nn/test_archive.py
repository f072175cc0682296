"""The archive format shared by model files and checkpoints: atomic writes, headers checked
before data, and one clear ArchiveError for every malformed file load_model meets."""
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from cnnx import nn
from cnnx.nn import archive


def small_model(compiled=True):
    model = nn.Sequential([nn.Conv2D(3, 3, activation="relu"), nn.BatchNormalization(),
                           nn.Flatten(), nn.Dense(2, activation="softmax")],
                          input_shape=(5, 5, 1), seed=1)
    if compiled:
        model.compile("nadam", "sparse_categorical_crossentropy", ["accuracy"])
        rng = np.random.default_rng(0)
        model.fit(rng.normal(size=(8, 5, 5, 1)), np.arange(8) % 2, batch_size=4, verbose=0)
    return model


def npy_bytes(value):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=True)
    return buffer.getvalue()


def npy_header(shape, descr="<f4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def write_zip(path, entries):
    """A zip of raw entries {name: bytes}, ".npy" appended to each name as np.savez does."""
    with zipfile.ZipFile(path, "w") as file:
        for name, data in entries.items():
            file.writestr(f"{name}.npy", data)
    return path


def saved_entries(model, path):
    """The raw entries of a model file save wrote, to tamper with."""
    model.save(path)
    with zipfile.ZipFile(path) as file:
        return {name[: -len(".npy")]: file.read(name) for name in file.namelist()}


def dense_architecture(features, units):
    return {"name": "sequential", "input_shape": [features], "seed": 0,
            "layers": [{"class_name": "Dense", "config": {"units": units, "name": "dense"}}]}


# ------------------------------------------------------------------------------ the format

def test_archive_round_trip_reads_headers_first_and_numpy_still_opens_it(tmp_path):
    weights = {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
               "dense/transposed": np.asfortranarray(np.ones((3, 2), np.float32) * 2),
               "flags": np.array([True, False])}
    path = archive.write_archive(tmp_path / "a.npz", weights, {"iterations": np.int64(7)},
                                 {"meta": {"epoch": 2, "loss": [np.float32(0.5), float("nan")],
                                           "nested": {"a": [1, None, "x"]}}})
    with archive.open_archive(path) as opened:
        assert opened.weights["dense/kernel"].shape == (2, 3)
        assert opened.weights["dense/kernel"].dtype == np.float32
        assert opened.documents == ("meta",)
        for name, value in weights.items():
            np.testing.assert_array_equal(opened.read("weights", name), value)
        assert opened.read("optimizer", "iterations") == 7
        meta = opened.document("meta")
        assert meta["epoch"] == 2 and meta["nested"] == {"a": [1, None, "x"]}
        assert meta["loss"][0] == 0.5 and np.isnan(meta["loss"][1])
        out = np.empty((2, 3), np.float32)
        opened.read_into("weights", "dense/kernel", out)
        np.testing.assert_array_equal(out, weights["dense/kernel"])
    with np.load(path, allow_pickle=False) as plain:
        assert set(plain.files) == {"weights/dense/kernel", "weights/dense/transposed",
                                    "weights/flags", "optimizer/iterations", "meta"}


def test_write_is_atomic_and_leaves_nothing_behind_on_failure(tmp_path):
    path = tmp_path / "a.npz"
    archive.write_archive(path, {"w": np.ones(2, np.float32)}, {}, {"meta": {"v": 1}})
    with pytest.raises(TypeError, match="a object cannot be stored"):
        archive.write_archive(path, {"w": np.zeros(2, np.float32)}, {}, {"meta": {"v": object()}})
    with pytest.raises(TypeError, match="never pickles"):
        archive.write_archive(path, {"w": np.array([None], dtype=object)}, {}, {})
    assert os.listdir(tmp_path) == ["a.npz"]                  # no temporary file left over
    with archive.open_archive(path) as opened:                 # the old file, intact
        assert opened.document("meta") == {"v": 1}
    (tmp_path / "plain").write_bytes(b"")                      # the mode a plain open gives
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain").st_mode


def test_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.path.realpath(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    archive.write_archive(tmp_path / "a.npz", {"w": np.ones(2, np.float32)}, {}, {})
    assert len(synced) == 2
    assert os.path.dirname(synced[0]) == str(tmp_path)         # the temporary file, then
    assert synced[0].endswith(".tmp")                          # the folder after the rename
    assert synced[1] == str(tmp_path)


def test_entries_holding_python_objects_are_refused_before_unpickling(tmp_path):
    path = write_zip(tmp_path / "m.npz", {"architecture": npy_bytes("{}"),
                                          "weights/x": npy_bytes(np.array([{}], dtype=object))})
    with pytest.raises(nn.ArchiveError, match="holds Python objects"):
        archive.open_archive(path)


def test_declared_size_must_match_the_header(tmp_path):
    path = write_zip(tmp_path / "m.npz", {
        "weights/x": npy_header((2, 3)) + bytes(24) + b"trailing junk"})
    with pytest.raises(nn.ArchiveError, match=r"declares shape \(2, 3\) of float32 \(24 bytes\)"
                                              r" but the zip holds 37 bytes"):
        archive.open_archive(path)


# ------------------------------------------------------------------------ load_model errors

MALFORMED = {
    "truncated": lambda path, entries: path.write_bytes(
        _zip_bytes(entries)[: len(_zip_bytes(entries)) // 2]),
    "text file": lambda path, entries: path.write_text("weights, not really\n"),
    "not cnnx": lambda path, entries: np.savez(path, weights=np.zeros(3)),
    "missing weights": lambda path, entries: write_zip(
        path, {k: v for k, v in entries.items() if k != "weights/dense/kernel"}),
    "extra weights": lambda path, entries: write_zip(
        path, {**entries, "weights/dense/extra": npy_bytes(np.zeros(2, np.float32))}),
    "wrong shape": lambda path, entries: write_zip(
        path, {**entries, "weights/dense/kernel": npy_bytes(np.zeros((2, 2), np.float32))}),
    "wrong dtype": lambda path, entries: write_zip(
        path, {**entries, "weights/dense/bias": npy_bytes(np.zeros(2, np.float64))}),
    "unknown layer": lambda path, entries: write_zip(path, {**entries, "architecture": npy_bytes(
        entries_architecture(entries).replace('"Dense"', '"Transformer"'))}),
    "bad JSON": lambda path, entries: write_zip(path, {**entries, "architecture": npy_bytes(
        entries_architecture(entries)[:-3])}),
    "bad layer options": lambda path, entries: write_zip(path, {**entries, "architecture":
        npy_bytes(entries_architecture(entries).replace('"units": 2', '"units": -2'))}),
    "no architecture": lambda path, entries: write_zip(
        path, {k: v for k, v in entries.items() if k != "architecture"}),
    "wrong optimizer state": lambda path, entries: write_zip(
        path, {**entries, "optimizer/m/dense/kernel": npy_bytes(np.zeros(3, np.float32))}),
    "unknown optimizer slot": lambda path, entries: write_zip(
        path, {**entries, "optimizer/ghost/dense/kernel": npy_bytes(np.zeros(3, np.float32))}),
    "unknown optimizer": lambda path, entries: write_zip(path, {**entries, "compile": npy_bytes(
        json.dumps({"optimizer": {"name": "Sgdx"}, "loss": "x", "metrics": []}))}),
    "unexpected document": lambda path, entries: write_zip(
        path, {**entries, "notes": npy_bytes("hello")}),
}


def _zip_bytes(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as file:
        for name, data in entries.items():
            file.writestr(f"{name}.npy", data)
    return buffer.getvalue()


def entries_architecture(entries):
    return str(np.lib.format.read_array(io.BytesIO(entries["architecture"])))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_file_gets_one_archive_error_naming_the_path(case, tmp_path):
    entries = saved_entries(small_model(), tmp_path / "good.npz")
    path = tmp_path / "model.npz"
    MALFORMED[case](path, entries)
    with pytest.raises(nn.ArchiveError) as caught:
        nn.load_model(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(caught.value, ValueError) and caught.value.path == str(path)
    assert str(pickle.loads(pickle.dumps(caught.value))) == message     # crosses Dask intact


def test_the_errors_say_what_is_wrong(tmp_path):
    entries = saved_entries(small_model(), tmp_path / "good.npz")
    expectations = {
        "truncated": "not a zip archive", "missing weights": r"missing \['dense/kernel'\]",
        "wrong shape": r"'dense/kernel' are float32 of shape \(2, 2\); the architecture expects"
                       r" float32 of shape \(27, 2\)",
        "wrong dtype": "'dense/bias' are float64", "unknown layer": "unknown layer class "
        "'Transformer'", "bad JSON": "not valid JSON", "no architecture": "missing 'architecture'",
        "wrong optimizer state": r"optimizer state 'm/dense/kernel' is float32 of shape \(3,\)",
        "unknown optimizer slot": "Nadam has no slot 'ghost'",
        "bad layer options": "Dense expects a positive number of units",
        "unknown optimizer": r"its optimizer \{'name': 'Sgdx'\} cannot be made",
        "not cnnx": "not a cnnx archive: entry 'weights'",
        "unexpected document": r"unexpected entries \['notes'\]"}
    for case, match in expectations.items():
        MALFORMED[case](tmp_path / f"{case}.npz", entries)
        with pytest.raises(nn.ArchiveError, match=match):
            nn.load_model(tmp_path / f"{case}.npz")


def test_damaged_copies_load_identically_or_raise_archive_error(tmp_path):
    """Cut short or with a few bytes changed anywhere (zip headers, .npy headers, data):
    either the damage was harmless (a zip field cnnx does not use) or one ArchiveError."""
    model = small_model()
    model.save(tmp_path / "good.npz")
    original = (tmp_path / "good.npz").read_bytes()
    rng = np.random.default_rng(11)
    path, outcomes = tmp_path / "damaged.npz", set()
    for attempt in range(300):
        damaged = bytearray(original)
        if attempt % 3 == 0:
            damaged = damaged[: rng.integers(0, len(damaged))]
        else:
            for position in rng.integers(0, len(damaged), rng.integers(1, 4)):
                damaged[position] = rng.integers(0, 256)
        path.write_bytes(damaged)
        try:
            loaded = nn.load_model(path)
        except nn.ArchiveError:
            outcomes.add("refused")
            continue
        outcomes.add("loaded")
        for key, value in model.get_weights().items():
            np.testing.assert_array_equal(loaded.get_weights()[key], value)
        for key, value in model.optimizer.state_dict().items():
            np.testing.assert_array_equal(loaded.optimizer.state_dict()[key], value)
    assert outcomes == {"refused", "loaded"}


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file at"):
        nn.load_model(tmp_path / "nothing.npz")


def test_load_model_builds_without_drawing_weights_and_keeps_the_config(tmp_path, rng):
    model = small_model()
    model.save(tmp_path / "m.npz")
    loaded = nn.load_model(tmp_path / "m.npz")
    assert loaded.get_config() == model.get_config()      # initializer names survive the load
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(loaded.get_weights()[key], value)
        assert loaded.get_weights()[key].flags.writeable
    x = rng.normal(size=(3, 5, 5, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    uncompiled = nn.load_model(tmp_path / "m.npz", compile=False)
    assert uncompiled.optimizer is None


# ------------------------------------------------------- nothing large before the checks

# Peak memory is VmHWM, the peak resident set of this process's own address space:
# ru_maxrss would not do, Linux carries it over fork and exec from the parent (pytest).
PROBE = textwrap.dedent("""
    import json, resource, sys, time

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) for l in lines if l.startswith(field)) * 1024

    # a ceiling well above what a correct loader needs, so a regression fails fast with
    # MemoryError instead of taking gigabytes from the machine
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize:") + 1536 * 2**20,
                                            resource.RLIM_INFINITY))
    from cnnx import nn
    before = status("VmHWM:")
    start = time.perf_counter()
    try:
        nn.load_model(sys.argv[1])
        outcome = "loaded"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome,
                      "grown_mb": (status("VmHWM:") - before) / 2**20}))
""")


def load_in_fresh_process(path):
    """load_model(path) in a new interpreter: its peak-memory growth, time and outcome."""
    result = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                            text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def big_dense_file(path, kernel_entry):
    """A 16384x16384 Dense (1 GiB of float32 weights) whose kernel entry is `kernel_entry`."""
    entries = {"architecture": npy_bytes(json.dumps(dense_architecture(16384, 16384))),
               "weights/dense/bias": npy_bytes(np.zeros(16384, np.float32))}
    if kernel_entry is not None:
        entries["weights/dense/kernel"] = kernel_entry
    return write_zip(path, entries)


@pytest.mark.parametrize("kernel", ["missing", "wrong shape", "truncated"])
def test_a_huge_architecture_fails_fast_without_allocating_it(kernel, tmp_path):
    entry = {"missing": None, "wrong shape": npy_bytes(np.zeros((4, 4), np.float32)),
             "truncated": npy_header((16384, 16384)) + bytes(4096)}[kernel]
    probe = load_in_fresh_process(big_dense_file(tmp_path / "big.npz", entry))
    assert probe["outcome"].startswith("ArchiveError: cannot load"), probe
    assert probe["grown_mb"] < 64, probe                   # the weights would be 1024 MB
    assert probe["seconds"] < 5, probe                     # generous: it takes milliseconds


def test_a_large_model_is_held_once_while_loading(tmp_path):
    # 64 MB of weights: drawing initial weights first (float64 draws) and reading each
    # entry into a fresh array before copying would take 3-4 times that
    model = nn.Sequential([nn.Dense(4096)], input_shape=(4096,))
    model.save(tmp_path / "m.npz")
    probe = load_in_fresh_process(tmp_path / "m.npz")
    assert probe["outcome"] == "loaded", probe
    assert probe["grown_mb"] < 64 * 1.5, probe


@pytest.fixture(scope="module")
def inflating_file(tmp_path_factory):
    """A 5 MB file whose kernel entry inflates to 1 GiB of zeros; its architecture wants 4x2."""
    path = tmp_path_factory.mktemp("bomb") / "model.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as file:
        file.writestr("architecture.npy", npy_bytes(json.dumps(dense_architecture(4, 2))))
        file.writestr("weights/dense/bias.npy", npy_bytes(np.zeros(2, np.float32)))
        with file.open("weights/dense/kernel.npy", "w", force_zip64=True) as entry:
            entry.write(npy_header((2**28,)))
            block = bytes(2**24)
            for _ in range(2**30 // len(block)):
                entry.write(block)
    return path


def test_an_entry_that_inflates_to_1_gib_is_not_allocated(inflating_file):
    probe = load_in_fresh_process(inflating_file)
    assert "'dense/kernel' are float32 of shape (268435456,)" in probe["outcome"], probe
    assert probe["grown_mb"] < 64, probe
