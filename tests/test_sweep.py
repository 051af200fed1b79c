"""sweep.py end to end: real train.py runs on the CPU, as local subprocesses and as tasks of a local Ray."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import Config
from conftest import ROOT, TINY_FLAGS

# TINY_FLAGS less --task (the sweep sets it), shrunk further: 10 decisions per episode, one test
# episode, and two seed episodes before one planner episode, tested as the last.
TASK_AT = TINY_FLAGS.index("--task")
TINY = [*TINY_FLAGS[:TASK_AT], *TINY_FLAGS[TASK_AT + 2:], "--max-episode-length", "80", "--action-repeat", "8",
        "--episodes", "3", "--test-episodes", "1", "--collect-interval", "2"]


def sweep(log_dir, *args, extra=()):
    # The 4-run Ray grid ran past 600 s on 2 cores shared with three trainings: the timeout is
    # there to catch a hang, not to time the sweep.
    return subprocess.run([sys.executable, "sweep.py", "--log-dir", str(log_dir), *args, "--", *TINY, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)


def summary(stdout):
    """The sweep's final table: {(task, seed): {column: cell}}."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {(row["task"], int(row["seed"])): row for row in rows}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trained(run_dir, task, seed, episodes):
    """The run is the asked one and logged each episode once, with the final test after the last."""
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["task"], config["seed"], config["episodes"]) == (task, seed, episodes)
    records = metrics(run_dir)
    assert [r["episodes"] for r in records] == list(range(1, episodes + 1))
    assert "test/return" in records[-1]
    return records


def test_ray_trains_the_grid(tmp_path):
    result = sweep(tmp_path, "--ray", "--num-cpus", "2", "--tasks", "cartpole-swingup", "reacher-easy",
                   "--seeds", "0", "1", "--name", "grid")
    assert result.returncode == 0, result.stderr
    assert "Ray cluster with 2 CPUs and 0 GPUs, 1 CPU and 0 GPU per run" in result.stderr
    rows = summary(result.stdout)
    assert sorted(rows) == [("cartpole-swingup", 0), ("cartpole-swingup", 1), ("reacher-easy", 0),
                            ("reacher-easy", 1)]
    for (task, seed), row in rows.items():
        records = assert_trained(tmp_path / "grid" / task / f"seed{seed}", task, seed, 3)
        assert (row["status"], row["episodes"], row["attempts"]) == ("finished", "3/3", "1")
        assert row["last test return"] == f"{records[-1]['test/return']:.1f}"


def train_process(run_dir, flag):
    """The pid of the train.py process of `run_dir` started with `flag` (--run-dir or --resume), or None."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().decode().split("\0")
        except (OSError, ValueError):  # Not a process, or one that just ended.
            continue
        if any(arg.endswith("train.py") for arg in command) and str(run_dir) in command and flag in command:
            return int(entry)
    return None


def wait_for_train(sweeper, run_dir, flag, ready=lambda: True):
    """The pid of the sweep's train.py process of `run_dir` started with `flag`, once `ready()`."""
    deadline = time.monotonic() + 300
    while not (ready() and (pid := train_process(run_dir, flag))):
        assert sweeper.poll() is None, f"the sweep ended before a train.py {flag}: {sweeper.communicate()}"
        assert time.monotonic() < deadline, f"no train.py {flag} of {run_dir}"
        time.sleep(0.05)
    return pid


def test_ray_resubmits_a_killed_run_with_resume(tmp_path):
    run_dir = tmp_path / "sweep" / "cartpole-swingup" / "seed0"
    command = [sys.executable, "sweep.py", "--ray", "--num-cpus", "2", "--tasks", "cartpole-swingup",
               "--seeds", "0", "--max-retries", "1", "--log-dir", str(tmp_path), "--", *TINY]
    sweeper = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_train(sweeper, run_dir, "--run-dir", ready=(run_dir / "checkpoint.pt").exists)
        os.kill(pid, signal.SIGKILL)  # As an OOM killer or a lost machine would.
        stdout, stderr = sweeper.communicate(timeout=300)
    finally:
        sweeper.kill()
    assert sweeper.returncode == 0, stderr
    assert "cartpole-swingup seed 0 failed (killed by SIGKILL); resuming it (attempt 2 of 2)" in stderr
    row = summary(stdout)["cartpole-swingup", 0]
    assert (row["status"], row["episodes"], row["attempts"]) == ("finished", "3/3", "2")
    assert_trained(run_dir, "cartpole-swingup", 0, 3)
    log = (run_dir / "train.log").read_text()
    assert f"train.py --resume {run_dir} " in log and "resumed " in log


def test_local_sweep_resumes_a_killed_run_and_continues_after_sigterm(tmp_path):
    """Locally too, a run that dies is launched again with --resume. SIGTERM, a scheduler's stop,
    stops the sweep and the run it trains, as Ctrl-C does; the same command then finishes it."""
    run_dir = tmp_path / "sweep" / "cartpole-swingup" / "seed0"
    args = ("--tasks", "cartpole-swingup", "--seeds", "0", "--max-retries", "1")
    command = [sys.executable, "sweep.py", "--log-dir", str(tmp_path), *args, "--", *TINY]
    sweeper = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        os.kill(wait_for_train(sweeper, run_dir, "--run-dir", ready=(run_dir / "checkpoint.pt").exists),
                signal.SIGKILL)
        resumed = wait_for_train(sweeper, run_dir, "--resume")
        sweeper.send_signal(signal.SIGTERM)
        stdout, stderr = sweeper.communicate(timeout=300)
    finally:
        sweeper.kill()
    assert "cartpole-swingup seed 0 failed (killed by SIGKILL); resuming it (attempt 2 of 2)" in stderr
    assert sweeper.returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().endswith("interrupted; run the same command again to continue the sweep")
    assert not os.path.exists(f"/proc/{resumed}"), "the sweep stopped its run"
    episodes = metrics(run_dir)[-1]["episodes"]
    assert episodes < 3, "stopped before the end"
    again = sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    row = summary(again.stdout)["cartpole-swingup", 0]
    assert (row["status"], row["episodes"], row["attempts"]) == ("finished", "3/3", "1")
    assert_trained(run_dir, "cartpole-swingup", 0, 3)
    log = (run_dir / "train.log").read_text()
    assert log.count(f"train.py --resume {run_dir} ") == 2 and "resumed " in log


def test_local_sweep_continues_where_it_stopped(tmp_path):
    args = ("--tasks", "cartpole-swingup", "--seeds", "0", "1", "--local-workers", "2")
    first = sweep(tmp_path, *args, extra=["--episodes", "2"])
    assert first.returncode == 0, first.stderr
    assert "local: 2 at a time on the CPU, OMP_NUM_THREADS=1" in first.stderr
    assert {row["episodes"] for row in summary(first.stdout).values()} == {"2/2"}
    # The same sweep, asked for one more episode: both runs resume and train it.
    longer = sweep(tmp_path, *args)
    assert longer.returncode == 0, longer.stderr
    for row in summary(longer.stdout).values():
        assert (row["status"], row["episodes"], row["attempts"]) == ("finished", "3/3", "1")
    for seed in (0, 1):
        run_dir = tmp_path / "sweep" / "cartpole-swingup" / f"seed{seed}"
        assert_trained(run_dir, "cartpole-swingup", seed, 3)
        assert f"train.py --resume {run_dir} " in (run_dir / "train.log").read_text()
    # Once more: nothing left to train, so nothing starts.
    again = sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert {row["attempts"] for row in summary(again.stdout).values()} == {"0"}
    assert "2 finished before" in again.stderr
    # A setting that differs from the runs' own config is refused before anything starts.
    changed = sweep(tmp_path, *args, extra=["--horizon", "5"])
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "refused: --horizon 5 (the run has 3)" in changed.stderr


def test_grid_trains_each_variant_and_plot_draws_them(tmp_path):
    """`--grid model=rssm,gru collect=planner,random`: 4 variants of one task and seed, each in its
    own folder with its settings, then one row each in plot.py's table."""
    args = ("--tasks", "cartpole-swingup", "--seeds", "0", "--local-workers", "2",
            "--grid", "model=rssm,gru", "collect=planner,random")
    result = sweep(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    variants = [f"model={model},collect={collect}" for model in ("rssm", "gru") for collect in ("planner", "random")]
    table = summary(result.stdout)
    assert {task for task, _ in table} == {f"cartpole-swingup ({variant})" for variant in variants}
    assert {row["status"] for row in table.values()} == {"finished"}
    for model in ("rssm", "gru"):
        for collect in ("planner", "random"):
            run_dir = tmp_path / "sweep" / "cartpole-swingup" / f"model={model},collect={collect}" / "seed0"
            assert_trained(run_dir, "cartpole-swingup", 0, 3)
            config = json.loads((run_dir / "config.json").read_text())
            assert (config["model"], config["collect"]) == (model, collect)
    plotted = subprocess.run([sys.executable, "plot.py", str(tmp_path / "sweep"), "--out", str(tmp_path / "plots"),
                              "--episodes", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plotted.returncode == 0, plotted.stderr
    rows = [line for line in plotted.stdout.split("## Runs")[0].splitlines() if line.startswith("| cartpole")]
    assert sorted(row.split(" | ")[0] for row in rows) == sorted(
        f"| cartpole-swingup (collect={collect}, model={model})" for model in ("gru", "rssm")
        for collect in ("planner", "random"))
    again = sweep(tmp_path, *args)  # Continues the same sweep: all done.
    assert again.returncode == 0 and "4 finished before" in again.stderr


def test_a_gymnasium_task_from_pixels_and_states_sweeps_and_plots(tmp_path):
    args = ("--tasks", "gym:Pendulum-v1", "--seeds", "0", "--local-workers", "2", "--grid", "obs=pixels,state")
    result = sweep(tmp_path, *args, extra=["--embed-size", "16"])
    assert result.returncode == 0, result.stderr
    for obs in ("pixels", "state"):
        run_dir = tmp_path / "sweep" / "gym:Pendulum-v1" / f"obs={obs}" / "seed0"
        assert_trained(run_dir, "gym:Pendulum-v1", 0, 3)
        assert json.loads((run_dir / "config.json").read_text())["obs"] == obs
    plotted = subprocess.run([sys.executable, "plot.py", str(tmp_path / "sweep"), "--out", str(tmp_path / "plots"),
                              "--episodes", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plotted.returncode == 0, plotted.stderr
    rows = [line for line in plotted.stdout.split("## Runs")[0].splitlines() if line.startswith("| gym:")]
    assert sorted(row.split(" | ")[0] for row in rows) == ["| gym:Pendulum-v1 (obs=pixels)",
                                                           "| gym:Pendulum-v1 (obs=state)"]
    assert (tmp_path / "plots" / "learning_curves.png").stat().st_size > 0


def test_a_multitask_run_is_one_cell_of_a_sweep(tmp_path):
    result = sweep(tmp_path, "--tasks", "cartpole-swingup,finger-spin", "--seeds", "0", extra=["--seed-episodes", "1"])
    assert result.returncode == 0, result.stderr
    records = assert_trained(tmp_path / "sweep" / "cartpole-swingup,finger-spin" / "seed0",
                             "cartpole-swingup,finger-spin", 0, 3)
    assert {"test/return/cartpole-swingup", "test/return/finger-spin"} <= records[-1].keys()


@pytest.mark.parametrize("grid, message", [
    ("foo=1", "train.py has no setting --foo"),
    ("seed=1,2", "--seed is not a setting a variant can differ in; use --tasks and --seeds"),
    ("model=", "give KEY=V1,V2"),
    ("horizon=3,4", "--horizon is given twice"),
    ("model=rssm,lstm", "train.py refuses the flags of cartpole-swingup (model=lstm) seed 0: --model must be"),
])
def test_bad_grids_start_nothing(tmp_path, grid, message):
    result = sweep(tmp_path, "--tasks", "cartpole-swingup", "--seeds", "0", "--grid", grid)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--episodez", "3"], "train.py refuses the flags of cartpole-swingup seed 0: unrecognized arguments: --episodez"),
    (["--task", "cheetah-run"], "the sweep sets --task of each run itself"),
])
def test_bad_train_flags_start_nothing(tmp_path, extra, message):
    result = sweep(tmp_path, "--tasks", "cartpole-swingup", "--seeds", "0", extra=extra)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_run_refused_by_its_machine_is_not_retried(tmp_path):
    result = sweep(tmp_path, "--tasks", "cartpole-swingup", "--seeds", "0", "--max-retries", "2",
                   extra=["--device", "cuda"])
    assert result.returncode == 1
    row = summary(result.stdout)["cartpole-swingup", 0]
    assert (row["status"], row["episodes"], row["attempts"]) == ("failed (exit 2)", "0/3", "1")
    assert "no CUDA GPU is available" in result.stderr
    assert result.stderr.strip().endswith("error: 1 of 1 runs failed")


def test_local_runs_share_each_gpu(monkeypatch):
    """Which GPU each local run sees, with two of four GPUs selected by the user (no GPU here)."""
    import launchers
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    slots = launchers.local_slots(workers=1, runs_per_gpu=2, use_gpus=True)
    # Each run renders on its own GPU too: EGL does not read CUDA_VISIBLE_DEVICES.
    assert slots == [{"CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": "4", "MUJOCO_EGL_DEVICE_ID": gpu}
                     for gpu in ("3", "3", "5", "5")]
    # A Ray task: the GPU that Ray gave it; a GPU named by UUID gives EGL no number to use.
    assert launchers.render_on_own_gpu({"CUDA_VISIBLE_DEVICES": "6,7", "A": "1"}) == \
        {"CUDA_VISIBLE_DEVICES": "6,7", "A": "1", "MUJOCO_EGL_DEVICE_ID": "6"}
    assert "MUJOCO_EGL_DEVICE_ID" not in launchers.render_on_own_gpu({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"})
    # --device cpu, or no GPU: --local-workers runs that see no GPU split the cores.
    assert launchers.local_slots(workers=8, runs_per_gpu=2, use_gpus=False) == \
        [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}] * 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert len(launchers.local_slots(workers=3, runs_per_gpu=2, use_gpus=True)) == 3


def test_a_run_trains_to_the_episodes_of_its_command_line(tmp_path):
    """The bar's total and a run's target come from what train.py will do: --episodes, else the
    --preset's, else the default; on resume the run's own config's, or --episodes given again."""
    import sweep
    run = sweep.Run("cartpole-swingup", 0, tmp_path / "seed0")
    assert sweep.train_config(run, ["--preset", "small-state"])[0].episodes == 40
    assert sweep.train_config(run, ["--preset", "small-state", "--episodes", "7"])[0].episodes == 7
    assert sweep.train_config(run, [])[0].episodes == 1000
    run.path.mkdir()
    (run.path / "config.json").write_text(json.dumps(dataclasses.asdict(Config(episodes=12))))
    assert sweep.train_config(run, [])[0].episodes == 12
    assert sweep.train_config(run, ["--episodes", "20"])[0].episodes == 20
    assert sweep.train_config(run, ["--batch-size", "3"])[1].startswith("a resumed run keeps its config")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_summary_counts_a_presets_episodes(tmp_path):
    """No --episodes: the target is the preset's 40, not train.py's default 1000 (the run is
    refused at once by a machine without a GPU, so nothing trains)."""
    result = subprocess.run([sys.executable, "sweep.py", "--log-dir", str(tmp_path), "--tasks", "cartpole-swingup",
                             "--seeds", "0", "--", "--preset", "small-state", "--device", "cuda"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert summary(result.stdout)["cartpole-swingup", 0]["episodes"] == "0/40"
