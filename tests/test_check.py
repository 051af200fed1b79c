"""`bench.py --check`: every step runs, by the deadline, whatever another step does."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import check
from conftest import ROOT

DEADLINE = 150


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "bench.py", "--check", str(out), "--deadline", str(DEADLINE),
                             "--quick", "--device", "cpu", "--work-dir", str(work)],
                            cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE + 60)
    return result, out, work, time.monotonic() - start


def test_quick_check_runs_every_step_by_the_deadline(quick_check):
    result, out, _, seconds = quick_check
    summary = json.loads((out / "summary.json").read_text())
    assert seconds < DEADLINE + 10, "it ran past its deadline"
    assert list(summary["steps"]) == list(check.SHARES)
    assert all(step["status"] == "ok" for step in summary["steps"].values()), summary["steps"]
    assert result.returncode == 0, result.stderr
    for name in check.SHARES:  # The table at the end names every step.
        assert f"\n{name} " in "\n" + result.stdout
    setup = summary["setup"]
    assert setup["torch"] and setup["mujoco"] == "3.17.0" and setup["gl_renderer"]
    # On this machine MuJoCo renders with Mesa's llvmpipe: software, and the check says so.
    assert setup["software_rendering"] == ("llvmpipe" in setup["gl_renderer"])
    tests = summary["correctness"]["tests"]
    assert tests["test_update_step_matches_the_cpu[tf32]"] == "passed"
    assert summary["correctness"]["paths"]["tf32"] == "passed"
    assert summary["correctness"]["paths"]["compile_update"] == "untested"  # Left out by --quick.
    assert summary["figures"]["eager"]["update_ms"] > 0 and summary["figures"]["eager"]["plan_ms"] > 0
    assert summary["figures"]["chosen"]["speed_paths"] == ["tf32"] and "projection" not in summary


def test_quick_check_kills_resumes_and_evaluates_the_run(quick_check):
    _, out, work, _ = quick_check
    summary = json.loads((out / "summary.json").read_text())
    training = summary["training"]
    assert "--tf32" in training["command"] and training["speed_paths"] == ["tf32"]
    assert training["resumed"] and 0 < training["killed_after_episodes"] < training["episodes"]
    assert training["updates"] > 0 and training["tests"], training
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["episodes"] for m in metrics] == list(range(1, training["episodes"] + 1))
    assert len(summary["evaluation"]["returns"]) == 2
    assert (out / "prediction.gif").read_bytes()[:6] == b"GIF89a"
    assert "resumed " in (out / "check.log").read_text()
    # What comes back from a GPU box: at most 8 files, none over 16 MiB or deeper than one folder.
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(path.stat().st_size < 16 * 2**20 for path in files)
    assert all(len(path.relative_to(out).parts) <= 2 for path in files)
    assert (work / "run" / "checkpoint.pt").exists()


def test_a_step_that_hangs_or_raises_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    """A step is stopped at its budget, its child processes with it; an error inside the check
    itself is recorded too; and the summary is on disk after each step."""
    ours = check.Check(tmp_path / "out", deadline=60, device="cpu", quick=True, work_dir=tmp_path / "work")
    child = tmp_path / "child.pid"
    hang = [sys.executable, "-c", "import os, subprocess, sys, time; "
            f"open({str(child)!r}, 'w').write(str(subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']).pid)); time.sleep(60)"]
    monkeypatch.setattr(check, "MIN_SECONDS", {"a": 3, "b": 0, "c": 0})
    monkeypatch.setattr(check, "SHARES", {"a": 0.01, "b": 0.5, "c": 0.5})
    start = time.monotonic()
    ours.step("a", ["b", "c"], lambda end: (ours.run("hang", hang, end - time.monotonic())[0], "stuck"))
    assert time.monotonic() - start < 10
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]["a"]["status"] == "timeout"
    assert not alive(int(child.read_text())), "the hung step's own child outlived it"
    ours.step("b", ["c"], lambda end: 1 / 0)
    ours.step("c", [], lambda end: ("ok", None))
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    assert steps["b"]["status"] == "failed" and "ZeroDivisionError" in steps["b"]["error"]
    assert steps["c"]["status"] == "ok"


def alive(pid):
    """Whether process `pid` runs (a killed one may linger as a zombie until it is reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_path_tests_name_collected_tests():
    """Every test that a speed path must pass exists (a renamed test would leave a path untested)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_device.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = {line.split("::")[-1] for line in result.stdout.splitlines() if "::" in line}
    named = {test for tests in check.PATH_TESTS.values() for test in tests}
    assert named <= collected, named - collected
    assert set(check.PATH_TESTS) == set(check.SPEED_PATHS) == set(check.PATH_FIGURES)


def test_a_path_is_used_only_if_all_its_tests_passed_and_it_is_not_slower():
    tests = ("a", "b")
    assert check.path_status({"a": "passed", "b": "passed"}, tests) == "passed"
    assert check.path_status({"a": "passed", "b": "failed"}, tests) == "failed"
    assert check.path_status({"a": "passed", "b": "error"}, tests) == "failed"
    assert check.path_status({"a": "passed"}, tests) == "untested"
    assert check.path_status({"a": "passed", "b": "skipped"}, tests) == "untested"
    ours = check.Check.__new__(check.Check)
    ours.quick = False
    eager_spread = {"update": {"median": 10.0, "max": 11.0}, "plan": {"median": 5.0, "max": 5.5}}
    ours.summary = {"correctness": {"paths": {"tf32": "passed", "bf16": "passed", "compile_update": "failed",
                                              "capture_planner": "passed", "capture_update": "passed"}},
                    "figures": {"eager": {"update_ms": 10.0, "plan_ms": 5.0, "spread": eager_spread},
                                # Slower than eager's median, inside its spread: not slower.
                                "tf32": {"update_ms": 8.0, "plan_ms": 5.2}, "bf16": {"update_ms": 30.0},
                                "capture_update": {"update_ms": 11.5}},
                    "figures_status": {"capture_planner": "timed out after 20 s"}}
    paths, left_out = ours.training_paths()
    assert paths == ["tf32"] and sorted(left_out) == ["bf16", "capture_planner", "capture_update"]
    assert "update_ms 30 > eager's slowest 11" in left_out["bf16"] and "timed out" in left_out["capture_planner"]
    del ours.summary["correctness"]  # No device tests in this check: training takes the defaults.
    assert ours.training_paths() == (None, {})


def fake_bench(commands, slow=()):
    """A `Check.run` that plays bench.py --variants: it records the command and writes each
    variant's figures, the paths in `slow` making the update step three times slower."""
    def run(name, command, seconds):
        commands.append([str(c) for c in command])
        variants = command[command.index("--variants") + 1:]
        figures = {}
        for variant in variants:
            paths = [] if variant == "eager" else variant.split(",")
            update = 30.0 if set(paths) & set(slow) else 10.0
            figures[variant] = {"speed_paths": paths, "update_ms": update, "plan_ms": 5.0,
                                "spread": {"update": {"median": update, "max": update * 1.05},
                                           "plan": {"median": 5.0, "max": 5.2}},
                                "iteration_s": 3.6, "iteration": {"episode_steps": 250},
                                "test_steps_per_s": {"parallel": 500.0}, "peak_rss_mb": 1.0}
        command[command.index("--json") + 1].write_text(json.dumps(figures))
        return "ok", 1.0, ""
    return run


def figures_of(command):
    return command[command.index("--figures") + 1:command.index("--variants")]


def variants_of(command):
    return command[command.index("--variants") + 1:]


def test_projection_of_a_paper_run():
    """995 iterations and 100 tests of 10 parallel 250-step episodes, in hours."""
    figures = {"iteration_s": 3.6, "iteration": {"episode_steps": 250}, "test_steps_per_s": {"parallel": 500.0}}
    projection = check.projection(figures)
    assert projection["test_s"] == 5.0  # 2500 agent steps at 500 per second (all 10 episodes).
    assert projection["cheetah_run_1000_episodes_hours"] == pytest.approx((995 * 3.6 + 100 * 5) / 3600, abs=0.01)
    assert check.projection({"iteration_s": 1.0, "iteration": {"episode_steps": 5}}) is None  # --quick


def test_full_figures_measure_eager_each_path_then_the_chosen_ones(tmp_path, monkeypatch):
    """Without --quick, two bench processes: eager (launches, update, plan and env) and each path
    alone, then the paths that passed and were not slower, with the iteration and test figures
    for the projection."""
    ours = check.Check(tmp_path / "out", deadline=60, device="cuda", quick=False, work_dir=tmp_path / "work")
    ours.summary["correctness"] = {"paths": {path: "passed" for path in check.SPEED_PATHS}}
    commands = []
    monkeypatch.setattr(ours, "run", fake_bench(commands, slow=["bf16"]))
    assert ours.figures(time.monotonic() + 30) == ("ok", None)
    assert len(commands) == 2
    assert figures_of(commands[0]) == ["launches", "update", "plan", "env"]
    # The compiled path last: compiling takes minutes, and holds up no other figure.
    assert variants_of(commands[0]) == ["eager", *(p for p in check.SPEED_PATHS if p != "compile_update"),
                                        "compile_update"]
    assert figures_of(commands[1]) == ["update", "plan", "iteration", "test"]
    chosen = [path for path in check.SPEED_PATHS if path != "bf16"]
    assert variants_of(commands[1]) == [",".join(chosen)]
    assert ours.summary["figures"]["chosen"]["speed_paths"] == chosen
    assert ours.summary["projection"]["from"] == chosen
    assert ours.summary["projection"]["cheetah_run_1000_episodes_hours"] == pytest.approx(1.13, abs=0.01)


def test_without_a_passed_path_the_projection_comes_from_eager(tmp_path, monkeypatch):
    """No path passed its tests (as on the H200 on 2026-11-30): eager's launches, update, plan
    and env, then eager again with the iteration and the test, which the projection uses."""
    ours = check.Check(tmp_path / "out", deadline=60, device="cuda", quick=False, work_dir=tmp_path / "work")
    ours.summary["correctness"] = {"paths": {path: "failed" for path in check.SPEED_PATHS}}
    commands = []
    monkeypatch.setattr(ours, "run", fake_bench(commands))
    assert ours.figures(time.monotonic() + 30) == ("ok", None)
    assert [variants_of(c) for c in commands] == [["eager"], ["eager"]]
    assert ours.summary["projection"]["from"] == "eager"
    assert ours.summary["projection"]["cheetah_run_1000_episodes_hours"] == pytest.approx(
        (995 * 3.6 + 100 * 2500 / 500) / 3600, abs=0.01)


def test_a_timed_out_bench_keeps_the_figures_it_wrote(tmp_path, monkeypatch):
    """bench.py writes its JSON after every figure: a variant measured before the timeout stands,
    the one cut short is recorded as such and left out of training."""
    ours = check.Check(tmp_path / "out", deadline=60, device="cuda", quick=False, work_dir=tmp_path / "work")
    ours.summary["correctness"] = {"paths": {"capture_planner": "passed", "tf32": "passed"}}

    def run(name, command, seconds):
        partial = {"eager": {"update_ms": 10.0, "plan_ms": 5.0, "peak_rss_mb": 1.0},
                   "capture_planner": {"update_ms": 10.0, "plan_ms": 1.0, "peak_rss_mb": 1.0},
                   "tf32": {"update_ms": 9.0}}  # Cut short before its CEM call.
        command[command.index("--json") + 1].write_text(json.dumps(partial))
        return "timeout", seconds, "tf32 ..."

    monkeypatch.setattr(ours, "run", run)
    ours.figures(time.monotonic() + 30)
    assert ours.summary["figures"]["capture_planner"]["plan_ms"] == 1.0
    assert ours.summary["figures_status"]["capture_planner"] == "ok"
    assert "timed out" in ours.summary["figures_status"]["tf32"]
    assert ours.training_paths() == (["capture_planner"], {"tf32": ours.training_paths()[1]["tf32"]})


def test_at_the_h200s_timings_training_gets_most_of_the_deadline(tmp_path, monkeypatch):
    """The H200's measured times (2026-11-30: set-up 13.6 s; every other step as long as its
    budget allows, the worst case) on a clock of the test's own: at --deadline 540 with no path
    to compile, training gets at least 55% of it, and every step keeps its minimum."""
    clock = [0.0]
    monkeypatch.setattr(check.time, "monotonic", lambda: clock[0])
    ours = check.Check(tmp_path / "out", deadline=540, device="cuda", quick=False, work_dir=tmp_path / "work")

    def takes(seconds=None):
        def body(budget_end):
            clock[0] = budget_end if seconds is None else clock[0] + seconds
            return "ok", None
        return body

    for name in check.SHARES:
        monkeypatch.setattr(ours, name, takes(13.6 if name == "setup" else None))
    names = list(check.SHARES)
    for i, name in enumerate(names):
        ours.step(name, names[i + 1:], getattr(ours, name))
    budgets = {name: step["budget_s"] for name, step in ours.summary["steps"].items()}
    assert budgets["training"] >= 0.55 * 540, budgets
    assert all(budgets[name] >= check.MIN_SECONDS[name] for name in names), budgets
    assert budgets["correctness"] >= 50 and budgets["evaluation"] >= 45, budgets
    assert clock[0] <= 540
