"""Each experiment module runs its script once, in --quick mode, as a user would."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def run_quick(tmp_path_factory):
    """run_quick(name) -> (output folder, stdout) of `python experiments/NAME.py --quick`."""
    def run(name):
        out = tmp_path_factory.mktemp(name)
        done = subprocess.run([sys.executable, os.path.join("experiments", f"{name}.py"),
                               "--quick", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return out, done.stdout
    return run


@pytest.fixture(scope="session")
def sample_expected():
    """True where the full Fashion-MNIST is missing: --quick runs then read the sample."""
    from cnnx.data.datasets import FASHION_MNIST_DIR

    return not os.path.isdir(FASHION_MNIST_DIR)


@pytest.fixture(scope="session")
def fashion_mnist_sample():
    """The folder of the Fashion-MNIST sample that ships with the experiments."""
    return os.path.join(REPO, "experiments", "fashion_mnist_sample")
