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
from config import SPEED_PATHS, Config
from utils import read_jsonl, write_json, write_jsonl

ROOT = Path(__file__).resolve().parent
# Share of the time left that each step gets when it starts (what one leaves goes to the next),
# and the seconds it gets at least, as long as the later steps keep theirs. Training gets the most:
# a paper-settings run is the one result that needs the GPU's minutes. On the H200 (2026-11-30)
# a process start took about 10 s and eager bench.py over a minute, so the figures run in two
# bench processes only (every variant in one, `bench.py --variants`).
SHARES = {"setup": 0.03, "correctness": 0.1, "figures": 0.17, "training": 0.6, "evaluation": 0.1}
MIN_SECONDS = {"setup": 15, "correctness": 20, "figures": 20, "training": 30, "evaluation": 30}
# The tests of tests/test_device.py that a speed path must pass before the training run uses it.
# `[all]` is every path that training may combine, at once.
PATH_TESTS = {
    "capture_planner": ("test_cem_plan_matches_eager[capture_planner]", "test_cem_plan_matches_eager[all]"),
    "capture_update": ("test_update_step_matches_the_cpu[capture_update]",
                       "test_update_step_with_samples_matches_eager_on_the_device[capture_update]",
                       "test_update_step_matches_the_cpu[all]"),
    "compile_update": ("test_update_step_matches_the_cpu[compile_update]",
                       "test_update_step_with_samples_matches_eager_on_the_device[compile_update]"),
    "replay_on_device": ("test_device_replay_samples_what_the_host_replay_samples",
                         "test_checkpoints_move_between_the_cpu_and_the_device"),
    "tf32": ("test_update_step_matches_the_cpu[tf32]", "test_rollout_returns_match_eager[tf32]",
             "test_update_step_matches_the_cpu[all]", "test_cem_plan_matches_eager[all]"),
    "bf16": ("test_update_step_matches_the_cpu[bf16]", "test_update_step_matches_the_cpu[all]"),
}
# What each path speeds up: a path is left out of training if one of these figures was slower
# than every eager run of it (outside eager's spread, not a fixed ratio inside it).
PATH_FIGURES = {"capture_planner": ["plan"], "capture_update": ["update"], "compile_update": ["update"],
                "replay_on_device": ["update"], "tf32": ["update", "plan"], "bf16": ["update"]}
# Of the figures' time: the variants, then the paths chosen for training (iteration and test).
VARIANTS_SHARE = 0.6
# The device tests that compile (minutes on a GPU for the paper-size... here tiny models, still
# the slowest): they run last, so that a timeout loses only them. --quick leaves them out, and
# bf16, which a CPU without bf16 units runs about 3 times slower, and the training runs.
COMPILE_TESTS = "compile_update"
QUICK_TESTS = "not compile_update and not capture and not all and not checkpoints and not bf16"
TRAIN_TASK = "cartpole-swingup"
QUICK_TRAIN = ["--max-episode-length", "200", "--seed-episodes", "2", "--collect-interval", "3",
               "--batch-size", "4", "--chunk-length", "8", "--horizon", "3", "--iterations", "2",
               "--candidates", "16", "--top-candidates", "4", "--test-interval", "2",
               "--test-episodes", "2", "--belief-size", "16", "--state-size", "4",
               "--hidden-size", "16", "--reward-hidden-size", "16", "--cnn-depth", "4"]
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
        """The device tests; those that compile in a second pytest run after the others, so that
        the others' outcomes stand even if compiling runs out of time."""
        command = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-m", "device",
                   "--device", self.device, "tests/test_device.py", "-k"]
        runs = [("correctness", QUICK_TESTS)] if self.quick else [
            ("correctness", f"not {COMPILE_TESTS}"), ("correctness-compile", COMPILE_TESTS)]
        outcomes, statuses, errors = {}, [], []
        for name, selection in runs:
            status, seconds, text = self.run(name, command + [selection], budget_end - time.monotonic())
            outcomes.update(test_outcomes(text))  # Read from the output: those that ran before a timeout count.
            statuses.append(status)
            errors.append(error_text(status, seconds, text))
        # --quick runs no combination tests: its paths pass on their own tests.
        paths = {path: path_status(outcomes, [t for t in tests if not (self.quick and "[all]" in t)])
                 for path, tests in PATH_TESTS.items()}
        self.summary["correctness"] = {"tests": outcomes, "paths": paths}
        failed = [status for status in statuses if status != "ok"]
        return (failed[0] if failed else "ok"), "\n".join(e for e in errors if e) or None

    def passed_paths(self):
        paths = self.summary.get("correctness", {}).get("paths", {})
        return [path for path in SPEED_PATHS if paths.get(path) == "passed"]

    def training_paths(self):
        """The paths that passed their tests, less those that the figures showed slower than eager
        (bf16 on a CPU without bf16 units, say; not --quick's figures, which measure nothing).
        -> (paths, {path left out: why}); paths None when this check ran no device tests: then
        training takes the device's defaults (`config.CUDA_DEFAULTS`)."""
        if "correctness" not in self.summary:
            return None, {}
        if self.quick:
            return self.passed_paths(), {}
        figures, statuses = self.summary.get("figures", {}), self.summary.get("figures_status", {})
        eager, chosen, left_out = figures.get("eager", {}), [], {}
        for path in self.passed_paths():
            ours = figures.get(path, {})
            missing = [f for f in PATH_FIGURES[path] if f"{f}_ms" not in ours]
            if missing:  # Its bench run failed or ran out of time: not shown to work.
                left_out[path] = f"its figures: {statuses.get(path, 'not measured')}"[:300]
                continue
            slower = [f"{f}_ms {ours[f + '_ms']:.4g} > eager's slowest {slowest(eager, f):.4g}"
                      for f in PATH_FIGURES[path] if slowest(eager, f) is not None and ours[f + "_ms"] > slowest(eager, f)]
            if slower:
                left_out[path] = "slower than eager: " + ", ".join(slower)
            else:
                chosen.append(path)
        return chosen, left_out

    def bench(self, name, variants, figures, seconds):
        """One bench.py process measuring `variants` (each a list of paths) in turn; their figures
        into the summary, as far as it got, also after a timeout. -> the status."""
        out = self.work / f"bench-{name}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, "bench.py", "--device", self.device, "--json", out, "--figures", *figures,
                   "--variants", *(",".join(paths) or "eager" for paths in variants)]
        command += ["--quick", "--repeats", "1"] if self.quick else []
        status, seconds, text = self.run(f"bench-{name}", command, seconds)
        measured = json.loads(out.read_text()) if out.exists() else {}
        results, statuses = self.summary.setdefault("figures", {}), self.summary.setdefault("figures_status", {})
        for paths in variants:
            key = name if name == "chosen" else (paths[0] if paths else "eager")
            variant = ",".join(paths) or "eager"
            if variant in measured:
                results[key] = measured[variant]
            complete = variant in measured and "peak_rss_mb" in measured[variant]
            statuses[key] = "ok" if complete else error_text(status if status != "ok" else "failed",
                                                             seconds, text, 400)
        self.save()
        return status

    def figures(self, budget_end):
        """One bench.py process: eager (its kernel launches, the update step, the CEM call, the
        envs) and each path that passed alone (update step and CEM call). A second: the paths
        that training will use (`training_paths`; the device's defaults if this check ran no
        device tests; eager where none passed) with the training iteration and the test; and the
        hours of a paper run at those figures. A path that failed its tests is not measured: it
        stays off whatever its speed."""
        # Compiling takes minutes: the compiled path last, so that it holds up no other figure.
        passed = sorted(self.passed_paths(), key=lambda path: path == "compile_update")
        variants = [[]] + ([] if self.quick else [[path] for path in passed])
        first = ["update", "plan"] if self.quick else ["launches", "update", "plan", "env"]
        status = self.bench("variants", variants, first, (budget_end - time.monotonic()) * VARIANTS_SHARE)
        paths = self.training_paths()[0]
        chosen = paths if paths is not None else self.default_paths()
        second = ["update", "plan"] if self.quick else ["update", "plan", "iteration", "test"]
        chosen_status = self.bench("chosen", [chosen], second, budget_end - time.monotonic())
        if not self.quick:
            self.summary["projection"] = projection(self.summary["figures"].get("chosen", {}))
        errors = [f"{name}: {text}" for name, text in self.summary["figures_status"].items() if text != "ok"]
        ok = status == chosen_status == "ok" and not errors
        return ("ok" if ok else "failed"), "\n".join(errors) or None

    def default_paths(self):
        return Config().for_device(self.device).speed_paths()

    def training(self, budget_end):
        """Train until the budget is spent (or the run is done): SIGKILL once the run has
        checkpointed an episode collected with the planner, then --resume."""
        run_dir = self.work / "run"
        paths, left_out = self.training_paths()
        flags = [] if paths is None else [flag(path) if path in paths else flag(path, False) for path in SPEED_PATHS]
        command = [sys.executable, "train.py", "--task", TRAIN_TASK, "--device", self.device, *flags]
        command += [*QUICK_TRAIN, "--episodes", "5"] if self.quick else ["--episodes", "100"]
        record = self.summary["training"] = {"command": " ".join(command[1:]) + f" --run-dir {run_dir}",
                                             "speed_paths": self.default_paths() if paths is None else paths,
                                             "paths_left_out": left_out,
                                             "run_dir": str(run_dir)}
        seed_episodes = int(command[command.index("--seed-episodes") + 1]) if self.quick else 5
        metrics = run_dir / "metrics.jsonl"
        planned = lambda: any(r.get("episodes", 0) > seed_episodes for r in read_jsonl(metrics))
        # The kill: after the first planned episode's checkpoint, or a third of the way through.
        kill_at = time.monotonic() + (budget_end - time.monotonic()) / 3
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


def flag(path, on=True):
    return ("--" if on else "--no-") + path.replace("_", "-")


def slowest(figures, name):
    """The slowest run of figure `name` (update or plan) in bench.py's figures, or None."""
    stats = figures.get("spread", {}).get(name)
    return stats["max"] if stats else figures.get(f"{name}_ms")


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


def main(out_dir, deadline, device="auto", quick=False, work_dir=None, steps=None):
    """Run the check, or only its `steps`; -> exit status 0 when every step is ok."""
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check = Check(out_dir, deadline, device, quick, work_dir)
    unknown = sorted(set(steps or []) - set(SHARES))
    if unknown:
        sys.exit(f"error: unknown --steps {', '.join(unknown)}; the steps are {', '.join(SHARES)}")
    names = [name for name in SHARES if not steps or name in steps]
    for i, name in enumerate(names):
        check.step(name, names[i + 1:], getattr(check, name))
    print(check.table())
    print(f"summary: {check.out / 'summary.json'}; the run: {check.work / 'run'}")
    return 0 if all(r["status"] == "ok" for r in check.summary["steps"].values()) else 1
