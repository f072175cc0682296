"""benchmarks/report.py on JSON that pytest-benchmark itself wrote."""
import os
import subprocess
import sys

from skimage import io

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TINY_SUITE = '''
import pytest

@pytest.mark.benchmark(group="sgemm")
@pytest.mark.parametrize("size", [8, 16])
def test_kernel(benchmark, size):
    benchmark(sum, range(size))
    benchmark.extra_info.update(ratio=1.5, gflops=3.0)

@pytest.mark.benchmark(group="training")
def test_step(benchmark):
    benchmark(sum, range(10))
    benchmark.extra_info.update(images_per_s=100.0, torch_best_images_per_s=80.0)

@pytest.mark.benchmark(group="scaling")
@pytest.mark.parametrize("workers", [1, 2])
def test_scaling(benchmark, workers):
    benchmark(sum, range(10))
    benchmark.extra_info.update(net="glasses", workers=workers,
                                efficiency=1.0 if workers == 1 else 0.9, mb_per_step=52.0)
'''


def test_report_writes_tables_and_plots(tmp_path):
    (tmp_path / "test_tiny.py").write_text(TINY_SUITE)
    saved = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path / "test_tiny.py"), "--benchmark-only",
                          f"--benchmark-json={saved}", "--benchmark-min-rounds=2"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "report.py"),
                          str(saved), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    results = (out / "results.md").read_text()
    for group in ("### sgemm", "### training", "### scaling"):
        assert group in results
    assert "| ratio" in results or "ratio |" in results
    for picture in ("speedup.png", "training.png", "scaling.png"):
        assert io.imread(out / picture).ndim == 3


def test_scaling_points_read_the_scaling_suites_nested_records():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_report", os.path.join(REPO, "benchmarks", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    record = {"bytes_out_per_step": 2e6, "bytes_in_per_step": 2e6,
              "bytes_between_workers_per_step": 1e6}
    info = {"one_worker": dict(record, workers=1), "two_workers": dict(record, workers=2),
            "efficiency_2": 0.8, "modelled_efficiency_4": 0.7}
    points = report.scaling_points([{"name": "test_sync[glasses]", "extra_info": info}])
    assert points["glasses"] == [(1, 1.0, 5.0, "measured"), (2, 0.8, 5.0, "measured"),
                                 (4, 0.7, None, "modelled")]
