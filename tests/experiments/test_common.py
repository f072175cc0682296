"""experiments/common.py: which Fashion-MNIST files a run reads."""
import importlib.util
import os

import numpy as np
import pytest

from cnnx import data
from cnnx.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def common():
    spec = importlib.util.spec_from_file_location(
        "experiments_common", os.path.join(REPO, "experiments", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_full_set(monkeypatch, tmp_path):
    """This machine as a fresh one sees it: no Debian Fashion-MNIST folder."""
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "absent"))


def test_quick_runs_without_the_full_set_read_the_shipped_sample(common, no_full_set, capsys):
    source = common.fashion_mnist_source(quick=True)
    assert source.directory == os.path.join(REPO, "experiments", "fashion_mnist_sample")
    assert "this --quick run reads the sample" in capsys.readouterr().out
    x, y, x_test, y_test, names = common.fashion_mnist(source, classes=(0, 6), n_train=500,
                                                       seed=1)
    assert x.shape == (500, 28, 28, 1) and x.dtype == np.float32 and set(y) == {0, 1}
    assert len(y_test) == 204 and names == ["T-shirt/top", "Shirt"]   # all the sample has


def test_full_runs_without_the_full_set_stop_with_how_to_install_it(common, no_full_set):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist.*--quick"):
        common.fashion_mnist_source(quick=False)


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                    reason="dataset-fashion-mnist absent (the sample case is tested above)")
def test_runs_read_the_full_set_where_it_is_installed(common):
    for quick in (True, False):
        source = common.fashion_mnist_source(quick)
        assert source.directory == datasets.FASHION_MNIST_DIR
        assert len(data.load_fashion_mnist(source.directory, "test").labels) == 10000
