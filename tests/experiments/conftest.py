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
