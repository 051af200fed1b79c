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
