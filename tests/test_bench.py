"""bench.py runs end to end and writes the figures others track (a smoke run, not a timing assert)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_quick_bench_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--repeats", "1", "--device", "cpu",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "CEM planning call" in result.stdout and "update step" in result.stdout
    figures = json.loads(out.read_text())
    for key in ("device", "update_ms", "sample_ms", "plan_ms", "iteration_s", "peak_rss_mb"):
        assert figures[key], key
    assert set(figures["env_steps_per_s"]) == {"cheetah-run", "cartpole-swingup"}
    assert all(rate > 0 for rate in figures["env_steps_per_s"].values())
    assert figures["update_ms"] > figures["sample_ms"] > 0 and figures["batch_ms"] > 0
    assert figures["gradients_ms"] > 0 and figures["step_ms"] > 0
    # The first calls (a compiled path's compile time) are timed apart from the warm figures.
    assert figures["update_first_s"] > 0 and figures["plan_first_s"] > 0
    assert set(figures["test_steps_per_s"]) == {"parallel", "sequential"}
    assert all(rate > 0 for rate in figures["test_steps_per_s"].values())


def test_the_launch_counter_counts_a_known_function_exactly():
    """Three kernels (add, relu, sum); a view launches none. A backward's ops count too."""
    import torch

    import bench
    x = torch.randn(4, 3)
    assert bench.count_launches(lambda: (x + 1).relu().view(-1).sum(), torch.device("cpu")) == {"ops": 3}
    w = torch.randn(3, 2, requires_grad=True)
    # Forward: mm, sum. Backward: the ones that seed it, mm for w's gradient (its transpose and
    # the seed's expand are views, and the first gradient is w.grad itself, a detach).
    assert bench.count_launches(lambda: (x @ w).sum().backward(), torch.device("cpu")) == {"ops": 4}


def test_variants_run_in_one_process_and_each_keeps_its_figures(tmp_path):
    """--variants: eager and a speed path measured in turn, the JSON holding each by name; the
    envs for the first only, the training iteration for the last only."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--repeats", "1", "--device", "cpu",
                             "--json", str(out), "--figures", "launches", "plan", "env", "iteration",
                             "--variants", "eager", "tf32,capture_update"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert list(figures) == ["eager", "tf32,capture_update"]
    eager, last = figures["eager"], figures["tf32,capture_update"]
    assert eager["speed_paths"] == [] and last["speed_paths"] == ["capture_update", "tf32"]
    assert eager["launches"]["plan"]["ops"] > 0 and "env_steps_per_s" in eager and "iteration_s" not in eager
    assert last["launches"]["update"]["ops"] > 0 and "env_steps_per_s" not in last and last["iteration_s"] > 0
    assert eager["plan_ms"] > 0 and last["plan_ms"] > 0
    bad = subprocess.run([sys.executable, "bench.py", "--quick", "--variants", "eager", "tf33"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown speed path tf33" in bad.stderr and "Traceback" not in bad.stderr
