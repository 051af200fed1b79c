"""Check a GPU box end to end in one command: `python bench.py --check OUT_DIR --deadline SECONDS`.

Five steps, each in subprocesses of its own with its own share of the time left, so that a step
that fails or hangs is stopped (its whole process group killed), recorded, and never keeps the
next from running:
1. set-up: versions, the GPU, and the OpenGL renderer of MuJoCo's context (GPU or software Mesa);
2. correctness: the tests marked `device` (tests/test_device.py) on the device; a speed path is
   used below only if all of its tests passed (`PATH_TESTS`);
3. figures: bench.py at the paper's sizes, eager, with each speed path, and with those that passed;
4. training: cartpole-swingup at the paper's settings with the paths that passed, killed with
   SIGKILL once it has planned an episode, resumed, and stopped when its share of time is spent;
5. evaluation: test.py (10 episodes) and video_prediction.py --gif on that run.
OUT_DIR gets `summary.json` (every figure, each step's status, time and error), written after
every step, a log of everything the subprocesses printed, the run's `metrics.jsonl`, the
prediction GIF. The run itself stays in a work folder (its checkpoint is
larger than what OUT_DIR should hold). `--quick` shrinks everything to a CPU smoke run.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench
from config import SPEED_PATHS
from utils import read_jsonl, write_json, write_jsonl

ROOT = Path(__file__).resolve().parent
# Share of the time left that each step gets when it starts (what one leaves goes to the next),
# and the seconds it gets at least, as long as the later steps keep theirs.
# On the H200 (2026-11-30, deadline 530 s) eager bench.py alone needed over a minute, and the
# figures are what the check is for: they get the largest share.
SHARES = {"setup": 0.04, "correctness": 0.2, "figures": 0.4, "training": 0.22, "evaluation": 0.14}
MIN_SECONDS = {"setup": 15, "correctness": 20, "figures": 20, "training": 30, "evaluation": 30}
# The tests of tests/test_device.py that a speed path must pass before the training run uses it.
PATH_TESTS = {
    "capture_planner": ("test_cem_plan_matches_eager[capture_planner]",),
    "compile_update": ("test_update_step_matches_the_cpu[compile_update]",
                       "test_update_step_with_samples_matches_eager_on_the_device[compile_update]"),
    "replay_on_device": ("test_device_replay_samples_what_the_host_replay_samples",
                         "test_checkpoints_move_between_the_cpu_and_the_device"),
    "tf32": ("test_update_step_matches_the_cpu[tf32]", "test_rollout_returns_match_eager[tf32]"),
    "bf16": ("test_update_step_matches_the_cpu[bf16]",),
}
# What each path speeds up, so that its figures run only those, and the weight of its bench run
# in the figures' time. The compiled paths compile first: the paper-size loss and its backward
# took 382 s to compile on the 2-core development VM (once per process), which 16 cores cut.
PATH_FIGURES = {"capture_planner": ["plan"], "compile_update": ["update"],
                "replay_on_device": ["update"], "tf32": ["update", "plan"], "bf16": ["update"]}
BENCH_WEIGHTS = {"eager": 1.5, "capture_planner": 2, "compile_update": 4, "replay_on_device": 0.5,
                 "tf32": 0.6, "bf16": 0.5, "chosen": 3.5}
# --quick: the device tests that take seconds on a CPU (no compiling, no training runs, and no
# bf16, which a CPU without bf16 units runs about 3 times slower).
QUICK_TESTS = "not compile_update and not capture_planner and not all and not checkpoints and not bf16"
TRAIN_TASK = "cartpole-swingup"
QUICK_TRAIN = ["--max-episode-length", "200", "--seed-episodes", "2", "--collect-interval", "3",
               "--batch-size", "4", "--chunk-length", "8", "--horizon", "3", "--iterations", "2",
               "--candidates", "16", "--top-candidates", "4", "--test-interval", "2",
               "--test-episodes", "2", "--belief-size", "16", "--state-size", "4",
               "--hidden-size", "16", "--reward-hidden-size", "16", "--cnn-depth", "4"]
SLOWER = 1.1  # A path this much slower than eager in its figures is not used for training.
LOG_LIMIT = 200_000  # Characters of each subprocess's output kept in the log.


def setup_report():
    """Step 1, run in its own process: print the versions and the renderer as one JSON line."""
    import importlib.metadata
    import platform

    import torch
    report = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "cpus": os.cpu_count(), "mujoco_gl": os.environ.get("MUJOCO_GL")}
    for package in ("mujoco", "dm_control", "gymnasium", "numpy"):
        report[package] = importlib.metadata.version(package)
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        report["gpu_capability"] = f"{properties.major}.{properties.minor}"
    from dm_control import suite
    from OpenGL import GL
    physics = suite.load("cartpole", "swingup").physics
    physics.render(64, 64)  # Makes the render context.
    with physics.contexts.gl.make_current() as context:
        report["gl_renderer"], report["gl_vendor"], report["gl_version"] = (
            context.call(lambda: [GL.glGetString(name).decode() for name in
                                  (GL.GL_RENDERER, GL.GL_VENDOR, GL.GL_VERSION)]))
    report["software_rendering"] = any(word in report["gl_renderer"].lower()
                                       for word in ("llvmpipe", "softpipe", "swrast"))
    print(json.dumps(report))


class Check:
    """The state of one check: the clock, OUT_DIR, the summary and the log."""

    def __init__(self, out_dir, deadline, device, quick, work_dir):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="planet-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start, self.end = time.monotonic(), time.monotonic() + deadline
        self.device, self.quick = device, quick
        self.log = self.out / "check.log"
        self.log.write_text("")
        self.summary = {"command": " ".join(sys.argv), "deadline_s": deadline, "device": device,
                        "quick": quick, "work_dir": str(self.work), "steps": {}}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}

    def left(self):
        return self.end - time.monotonic()

    def save(self):
        self.summary["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_json(self.out / "summary.json", self.summary)

    def note(self, text):
        with open(self.log, "a") as f:
            f.write(text + "\n")

    def launch(self, name, command, **kwargs):
        """Start `command` in a process group of its own, its output into a file of the work folder."""
        self.note(f"\n===== {name}: {' '.join(map(str, command))}")
        output = open(self.work / f"{name}.out", "w")
        process = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=self.env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        process.output_path, process.output = self.work / f"{name}.out", output
        return process

    def finish(self, process, budget_end, poll=None):
        """Wait for `process` until `budget_end` (a monotonic time), calling `poll()` meanwhile;
        kill its group if it runs over. -> (status, seconds, output text)."""
        started = time.monotonic()
        while process.poll() is None and time.monotonic() < budget_end:
            if poll is not None:
                poll()
            time.sleep(0.2)
        timed_out = process.poll() is None
        if timed_out:
            kill_group(process)
        process.output.close()
        text = process.output_path.read_text(errors="replace")
        self.note(text[-LOG_LIMIT:])
        status = "timeout" if timed_out else ("ok" if process.returncode == 0 else "failed")
        self.note(f"===== {status} (exit {process.returncode}) after {time.monotonic() - started:.1f} s")
        return status, time.monotonic() - started, text

    def run(self, name, command, seconds, poll=None):
        return self.finish(self.launch(name, command), time.monotonic() + seconds, poll)

    def step(self, name, later, body):
        """Run step `name` with its share of the time left, the `later` steps' minimums kept back;
        record its status, time and error."""
        available = self.left() - 3  # 3 s for the summary.
        shares_left = SHARES[name] + sum(SHARES[n] for n in later)
        budget = min(max(MIN_SECONDS[name], available * SHARES[name] / shares_left),
                     available - sum(MIN_SECONDS[n] for n in later))
        budget = max(0.0, budget)
        started = time.monotonic()
        record = self.summary["steps"][name] = {"status": "running", "budget_s": round(budget, 1)}
        self.save()
        try:
            status, error = body(started + budget)
        except Exception as bug:  # A bug of the check itself must not lose the other steps.
            status, error = "failed", f"{type(bug).__name__}: {bug}"
        record.update(status=status, seconds=round(time.monotonic() - started, 1),
                      error=error[-2000:] if error else None)
        self.save()

    # --- The steps. Each returns (status, error text or None). ---

    def setup(self, budget_end):
        status, seconds, text = self.run("setup", [sys.executable, "-c", "import check; check.setup_report()"],
                                         budget_end - time.monotonic())
        if status == "ok":  # The report is the last line that is a JSON object (warnings come first).
            self.summary["setup"] = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
        return status, error_text(status, seconds, text)

    def correctness(self, budget_end):
        command = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-m", "device",
                   "--device", self.device, "tests/test_device.py"]
        if self.quick:
            command += ["-k", QUICK_TESTS]
        status, seconds, text = self.run("correctness", command, budget_end - time.monotonic())
        outcomes = test_outcomes(text)  # Read from the output: those that ran before a timeout count.
        paths = {path: path_status(outcomes, tests) for path, tests in PATH_TESTS.items()}
        self.summary["correctness"] = {"tests": outcomes, "paths": paths}
        return status, error_text(status, seconds, text)

    def passed_paths(self):
        paths = self.summary.get("correctness", {}).get("paths", {})
        return [path for path in SPEED_PATHS if paths.get(path) == "passed"]

    def training_paths(self):
        """The paths that passed their tests, less those that the figures showed slower than eager
        (bf16 on a CPU without bf16 units, say; not --quick's figures, which measure nothing).
        -> (paths, {path left out: why})."""
        if self.quick:
            return self.passed_paths(), {}
        figures, statuses = self.summary.get("figures", {}), self.summary.get("figures_status", {})
        eager, chosen, left_out = figures.get("eager", {}), [], {}
        for path in self.passed_paths():
            if path not in figures:  # Its bench run failed or ran out of time: not shown to work.
                left_out[path] = f"its figures: {statuses.get(path, 'not measured')}"[:300]
                continue
            ours = figures[path]
            slower = [f"{key} {ours[key]:.4g} > {eager[key]:.4g}" for key in (f"{f}_ms" for f in PATH_FIGURES[path])
                      if key in ours and key in eager and ours[key] > SLOWER * eager[key]]
            if slower:
                left_out[path] = "slower than eager: " + ", ".join(slower)
            else:
                chosen.append(path)
        return chosen, left_out

    def figures(self, budget_end):
        """bench.py eager (update, plan and env), then (not --quick) each path that passed alone
        with the figures it speeds up, then the paths that training will use (`training_paths`,
        eager where none) with the training iteration and the test; and the hours of a paper run
        at those figures. A path that failed its tests is not measured: it stays off whatever its
        speed."""
        runs = [("eager", [], ["update", "plan"] if self.quick else ["update", "plan", "env"])]
        runs += [] if self.quick else [(path, [path], PATH_FIGURES[path]) for path in self.passed_paths()]
        weights = [BENCH_WEIGHTS[name] for name, _, _ in runs] + [BENCH_WEIGHTS["chosen"]]
        results, statuses = self.summary.setdefault("figures", {}), {}
        for i, (name, paths, figures) in enumerate(runs + [("chosen", None, None)]):
            if name == "chosen":  # Decided by the figures so far.
                paths = self.training_paths()[0]
                figures = ["update", "plan"] if self.quick else ["update", "plan", "iteration", "test"]
            out = self.work / f"bench-{name}.json"
            command = [sys.executable, "bench.py", "--device", self.device, "--json", out,
                       "--figures", *figures, *(flag(path) for path in paths)]
            command += ["--quick", "--repeats", "1"] if self.quick else []
            seconds = (budget_end - time.monotonic()) * weights[i] / sum(weights[i:])
            status, seconds, text = self.run(f"bench-{name}", command, seconds)
            statuses[name] = status if status == "ok" else error_text(status, seconds, text, 400)
            if status == "ok":
                results[name] = {k: v for k, v in json.loads(out.read_text()).items() if k != "spread"}
            self.summary["figures_status"] = statuses
            self.save()
        if not self.quick:
            self.summary["projection"] = projection(results.get("chosen", {}))
        errors = [f"{name}: {text}" for name, text in statuses.items() if text != "ok"]
        return ("ok" if not errors else "failed"), "\n".join(errors) or None

    def training(self, budget_end):
        """Train until the budget is spent (or the run is done): SIGKILL once the run has
        checkpointed an episode collected with the planner, then --resume."""
        run_dir = self.work / "run"
        paths, left_out = self.training_paths()
        command = [sys.executable, "train.py", "--task", TRAIN_TASK, "--device", self.device,
                   *(flag(path) for path in paths)]
        command += [*QUICK_TRAIN, "--episodes", "5"] if self.quick else ["--episodes", "100"]
        record = self.summary["training"] = {"command": " ".join(command[1:]) + f" --run-dir {run_dir}",
                                             "speed_paths": paths, "paths_left_out": left_out,
                                             "run_dir": str(run_dir)}
        seed_episodes = int(command[command.index("--seed-episodes") + 1]) if self.quick else 5
        metrics = run_dir / "metrics.jsonl"
        planned = lambda: any(r.get("episodes", 0) > seed_episodes for r in read_jsonl(metrics))
        # The kill: after the first planned episode's checkpoint, or half way through the budget.
        kill_at = time.monotonic() + (budget_end - time.monotonic()) / 2
        first = self.launch("train", command + ["--run-dir", run_dir])
        status, _, text = self.finish(first, kill_at, poll=lambda: planned() and checkpointed(run_dir, metrics)
                                      and kill_group(first, wait=False))
        killed = first.returncode == -signal.SIGKILL or status == "timeout"
        record["killed_after_episodes"] = len(read_jsonl(metrics))
        if not killed:  # It failed, or finished before the kill point.
            self.read_run(metrics)
            return status, error_text(status, 0, text)
        status, seconds, text = self.run("train-resumed", [sys.executable, "train.py", "--resume", run_dir],
                                         budget_end - time.monotonic())
        record["resumed"] = "resumed " in text
        self.read_run(metrics)
        if status == "timeout":  # Stopped at its budget, as planned: the run is resumable.
            record["stopped_at_budget"] = True
            status = "ok" if record["resumed"] else "failed"
        return status, error_text(status, seconds, text)

    def read_run(self, metrics):
        """The run's counters, tests and speed into the summary, its metrics.jsonl into OUT_DIR."""
        records, record = read_jsonl(metrics), self.summary["training"]
        if not records:
            return
        write_jsonl(self.out / "metrics.jsonl", records)
        record.update({key: records[-1][key] for key in ("episodes", "env_steps", "updates")})
        tests = [r for r in records if "test/return" in r]
        record["tests"] = [{"episodes": r["episodes"], "env_steps": r["env_steps"],
                            "return": r["test/return"], "std": r["test/return_std"]} for r in tests]
        trained = [r for r in records if "speed/updates_per_s" in r]
        if trained:
            record["updates_per_s"] = sorted(r["speed/updates_per_s"] for r in trained)[len(trained) // 2]
            record["collect_fps"] = sorted(r["speed/fps"] for r in trained)[len(trained) // 2]

    def evaluation(self, budget_end):
        run_dir, errors = self.work / "run", []
        gif = self.out / "prediction.gif"
        episodes = 2 if self.quick else 10
        length = ["--length", "10"] if self.quick else []
        status, seconds, text = self.run("test", [sys.executable, "test.py", run_dir, "--episodes", episodes,
                                                  "--device", self.device], (budget_end - time.monotonic()) * 0.6)
        record = self.summary["evaluation"] = {"test_status": status}
        if status == "ok":
            record["returns"] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("episode ")]
        else:
            errors.append(f"test.py: {error_text(status, seconds, text, 600)}")
        status, seconds, text = self.run("video", [sys.executable, "video_prediction.py", run_dir, "--gif",
                                                   "--out", gif, *length, "--device", self.device],
                                         budget_end - time.monotonic())
        record["video_status"] = status
        if status != "ok":
            errors.append(f"video_prediction.py: {error_text(status, seconds, text, 600)}")
        return ("ok" if not errors else "failed"), "\n".join(errors) or None

    def table(self):
        lines = [f"{'step':12} {'status':8} {'seconds':>8}  result"]
        for name, record in self.summary["steps"].items():
            lines.append(f"{name:12} {record['status']:8} {record.get('seconds', 0):8.1f}  {self.result(name)}")
        return "\n".join(lines)

    def result(self, name):
        s = self.summary
        if name == "setup" and "setup" in s:
            return f"torch {s['setup']['torch']}, {', '.join(s['setup'].get('gpus', ['no GPU']))}, " \
                   f"GL {s['setup']['gl_renderer']}"
        if name == "correctness" and "correctness" in s:
            outcomes = list(s["correctness"]["tests"].values())
            counts = ", ".join(f"{outcomes.count(o)} {o}" for o in ("passed", "failed", "error", "skipped")
                               if o in outcomes)
            return f"tests: {counts or 'none ran'}; paths passed: {', '.join(self.passed_paths()) or 'none'}"
        if name == "figures" and s.get("figures"):
            best = s["figures"].get("chosen", s["figures"].get("eager", {}))
            hours = (s.get("projection") or {}).get("cheetah_run_1000_episodes_hours")
            return ", ".join(f"{key} {best[key]:.4g}" for key in ("update_ms", "plan_ms", "iteration_s")
                             if key in best) + (f"; a paper run: {hours} h" if hours else "")
        if name == "training" and "training" in s:
            tests = s["training"].get("tests", [])
            return f"{s['training'].get('episodes', 0)} episodes, killed after " \
                   f"{s['training'].get('killed_after_episodes')} and resumed: {s['training'].get('resumed')}" + \
                   (f"; last test return {tests[-1]['return']:.1f}" if tests else "")
        if name == "evaluation" and s.get("evaluation", {}).get("returns"):
            returns = s["evaluation"]["returns"]
            return f"test.py mean return {sum(returns) / len(returns):.1f} over {len(returns)} episodes"
        return ""


def projection(figures):
    """Hours of a paper run of cheetah-run (1000 episodes, 5 of them seed episodes, a test of 10
    parallel episodes every 10) at `figures` of bench.py, whose training iteration is the paper's
    (100 updates and a 250-step episode, 1000 env steps at action repeat 4). None without them."""
    if "iteration_s" not in figures or figures.get("iteration", {}).get("episode_steps") != 250:
        return None
    iteration_s, test_rate = figures["iteration_s"], figures["test_steps_per_s"]["parallel"]
    test_s = 10 * 250 / test_rate  # 10 episodes of 250 steps; the rate counts all 10 together.
    hours = (995 * iteration_s + 100 * test_s) / 3600
    return {"cheetah_run_1000_episodes_hours": round(hours, 2), "iteration_s": iteration_s,
            "test_s": round(test_s, 1), "from": figures.get("speed_paths") or "eager"}


def flag(path):
    return "--" + path.replace("_", "-")


def error_text(status, seconds, text, characters=2000):
    """None for a step that went well, else what happened and the end of what it printed."""
    if status == "ok":
        return None
    what = f"timed out after {seconds:.0f} s" if status == "timeout" else "failed"
    return f"{what}; its output ends: {text[-characters:].strip()}"


def kill_group(process, wait=True):
    """SIGKILL the process and everything it started (its env workers): a crash, not a shutdown."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if wait:
        process.wait()


def checkpointed(run_dir, metrics):
    """Whether the checkpoint is at least as new as the last metrics line (it is written after)."""
    checkpoint = run_dir / "checkpoint.pt"
    return checkpoint.exists() and checkpoint.stat().st_mtime >= metrics.stat().st_mtime


def test_outcomes(text):
    """pytest -v output -> {test id: passed, failed, error or skipped}, for the tests that ended."""
    outcomes = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and "::" in words[0] and words[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            outcomes[words[0].split("::")[-1]] = words[1].lower()
    return outcomes


def path_status(outcomes, tests):
    """passed (all of `tests` passed), failed (one did not) or untested (one did not run)."""
    if any(outcomes.get(test) in ("failed", "error") for test in tests):
        return "failed"
    return "passed" if all(outcomes.get(test) == "passed" for test in tests) else "untested"


def main(out_dir, deadline, device="auto", quick=False, work_dir=None):
    """Run the check; -> exit status 0 when every step is ok."""
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check = Check(out_dir, deadline, device, quick, work_dir)
    names = list(SHARES)
    for i, name in enumerate(names):
        check.step(name, names[i + 1:], getattr(check, name))
    print(check.table())
    print(f"summary: {check.out / 'summary.json'}; the run: {check.work / 'run'}")
    return 0 if all(r["status"] == "ok" for r in check.summary["steps"].values()) else 1
