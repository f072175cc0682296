"""The source distribution carries the sources, and a wheel built from it has working kernels."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_LEFTOVERS = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so",
                                         "__pycache__", "cnnx-runs", ".hypothesis", "_kernels.c",
                                         ".benchmarks", "docs")


@pytest.mark.slow
def test_sdist_then_wheel_from_the_sdist(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=BUILD_LEFTOVERS)
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                         cwd=source, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "dist" / "cnnx-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"cnnx/_kernels.pyx", "csrc/cnnx_kernels.h", "csrc/gemm.c", "setup.py",
            "pyproject.toml", "README.md"} <= names
    assert "cnnx/_kernels.c" not in names           # generated: rebuilt from the .pyx

    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "wheel"), sdist],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "cnnx-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        (extension,) = [n for n in archive.namelist() if n.startswith("cnnx/_kernels")
                        and n.endswith(".so")]
        archive.extract(extension, tmp_path / "unpacked")
    # load the wheel's own compiled module (not the editable install's) and use it
    spec = importlib.util.spec_from_file_location("cnnx._kernels",
                                                  tmp_path / "unpacked" / extension)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    assert kernels.openmp_enabled()
