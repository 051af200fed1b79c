"""Train a grid of PlaNet runs, tasks x seeds: `python sweep.py [--ray] [-- <train.py flags>]`.

With no flag it runs the paper's grid, its 6 tasks x 5 seeds. Each run trains in a known directory,
`<log-dir>/<name>/<task>/seed<k>`, so the same command run again continues the sweep: finished runs
are skipped, the others resume from their last checkpoint (`train.py --resume`), missing ones start.
The flags after `--` go to every train.py run (e.g. `-- --episodes 500`).

`--grid KEY=V1,V2 ...` also varies train.py settings, each combination a variant trained in
`<log-dir>/<name>/<task>/<KEY=V,...>/seed<k>`: `--grid model=rssm,ssm,gru` gives the runs of the
paper's Figure 4, which `plot.py` draws as one curve per variant.

- Local (the default): train.py subprocesses on this machine, `--runs-per-gpu` on each GPU (a run
  sees only its GPU, through CUDA_VISIBLE_DEVICES, and renders there, through MUJOCO_EGL_DEVICE_ID),
  or `--local-workers` at a time without a GPU.
- Ray (`--ray`): each run is a Ray task asking for `--gpus-per-run` GPUs (a fraction lets runs share
  one), on the cluster at `--address` or on a Ray started here. The checkout and the log dir must
  be at the same paths on every node (shared storage); the driver reads the runs' progress there.

A run that dies (a non-zero exit, a lost Ray worker) is launched again with `--resume`, up to
`--max-retries` times. A bar shows the runs done and the episodes reached; at the end a table gives
each run's status, episodes, last test return, attempts and wall clock. Each run's own output goes
to `<run dir>/train.log`. The exit status is non-zero when a run failed for good.
"""
import argparse
import contextlib
import dataclasses
import io
import itertools
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from config import RESUME_MAY_CHANGE, Config
from config import parse_args as parse_train_args
from launchers import LocalLauncher, RayLauncher, local_slots
from utils import read_jsonl
from wrappers import PAPER_TASKS, parse_task, task_list

TRAIN = Path(__file__).resolve().parent / "train.py"
PAPER_SEEDS = (0, 1, 2, 3, 4)
POLL_SECONDS = 5  # How often the progress bar re-reads the runs' metrics.
USAGE_ERROR = 2  # train.py's exit status for a refused command line: the same command fails again.
SET_BY_SWEEP = ("--task", "--seed", "--run-dir", "--resume")


@dataclass
class Run:
    """One cell of the grid and what happened to it in this sweep."""

    task: str
    seed: int
    path: Path
    setting: dict = field(default_factory=dict)  # The --grid values of this run's variant.
    episodes: int = 0  # What its command line trains to (--episodes, its --preset's or its config's).
    status: str = "pending"
    attempts: int = 0
    seconds: float = 0.0  # Wall clock of this sweep's attempts.

    @property
    def label(self):
        """The task, with the variant if there is one: `cartpole-swingup (model=ssm)`."""
        return f"{self.task} ({variant_name(self.setting)})" if self.setting else self.task

    @property
    def name(self):
        return f"{self.label} seed {self.seed}"

    @property
    def flags(self):
        """train.py flags of the run's variant."""
        return [arg for key, value in self.setting.items() for arg in (f"--{key}", value)]

    @property
    def log(self):
        return self.path / "train.log"

    def progress(self):
        """-> (episodes reached, last test return or None), from metrics.jsonl."""
        records = read_jsonl(self.path / "metrics.jsonl")
        tests = [record["test/return"] for record in records if "test/return" in record]
        return (records[-1]["episodes"] if records else 0), (tests[-1] if tests else None)

    def done_before(self):
        """Whether an earlier sweep already trained this run to its target."""
        return (self.path / "config.json").is_file() and self.progress()[0] >= self.episodes

    def record(self, exit_status, seconds, max_retries):
        """Book an attempt that ended with `exit_status` (None: a Ray error, e.g. a lost worker).
        -> whether to launch the run again."""
        self.attempts += 1
        self.seconds += seconds
        if exit_status == 0:
            self.status = "finished"
            return False
        self.status = f"failed ({describe_exit(exit_status)})"
        return exit_status != USAGE_ERROR and self.attempts <= max_retries


def variant_name(setting):
    """The folder of a variant: `model=ssm`, `collect=random,iterations=1`."""
    return ",".join(f"{key}={value}" for key, value in setting.items())


def describe_exit(exit_status):
    if exit_status is None:
        return "Ray error"
    if exit_status < 0:
        return f"killed by {signal.Signals(-exit_status).name}"
    return f"exit {exit_status}"


def train_arguments(run, extra):
    """train.py and its flags for the run's next attempt: continue the run if it has a config."""
    if (run.path / "config.json").is_file():
        return [str(TRAIN), "--resume", str(run.path), *extra, *run.flags]
    return [str(TRAIN), "--run-dir", str(run.path), "--task", run.task, "--seed", str(run.seed), *extra,
            *run.flags]


def without_flag(arguments, flag):
    """`arguments` less `flag VALUE` and `flag=VALUE`."""
    kept, skip = [], False
    for argument in arguments:
        if not skip and argument != flag and not argument.startswith(flag + "="):
            kept.append(argument)
        skip = argument == flag
    return kept


def train_config(run, extra):
    """-> (the config of the run's next command line, None), or (None, train.py's objection to it:
    a typo, a flag that differs from a resumed run's config). Checked before any run starts, with
    --device cpu: the device is for the machine that trains (and may change on resume)."""
    arguments = [*train_arguments(run, without_flag(extra, "--device"))[1:], "--device", "cpu"]
    message = io.StringIO()
    logging.disable(logging.INFO)  # A preset's settings, once per run; each run's log has them.
    try:
        with contextlib.redirect_stderr(message):
            return parse_train_args(arguments)[0], None
    except SystemExit:
        return None, message.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
    finally:
        logging.disable(logging.NOTSET)


# --- The sweep. ---

@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C and SIGTERM wait for the end of the block, then raise KeyboardInterrupt: a run
    launched in it is on the launcher's record, which shutdown() stops, before the sweep stops."""
    received = []
    handlers = {number: signal.signal(number, lambda signum, frame: received.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if received:
            raise KeyboardInterrupt


def run_all(runs, launcher, extra, max_retries, bar):
    """Train `runs` to the end, each relaunched with --resume when it dies, retries first in line."""
    queue, live = deque(runs), {}
    while queue or live:
        while queue and launcher.has_room():
            run = queue.popleft()
            with deferred_interrupts():  # Else a run started as the sweep stops would train on, unseen.
                live[launcher.start(run, train_arguments(run, extra))] = run
        for handle, exit_status, seconds in launcher.wait(POLL_SECONDS):
            run = live.pop(handle)
            if run.record(exit_status, seconds, max_retries):
                logging.warning("%s %s; resuming it (attempt %d of %d)", run.name, run.status,
                                run.attempts + 1, max_retries + 1)
                queue.appendleft(run)
            else:
                bar.update()
        reached, target = sum(run.progress()[0] for run in runs), sum(run.episodes for run in runs)
        bar.set_postfix_str(f"{reached}/{target} episodes")


def last_line(path):
    """The last non-empty line of a log (progress bars redraw with carriage returns)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def summary_table(runs):
    rows = [["task", "seed", "status", "episodes", "last test return", "attempts", "wall clock"],
            ["---"] * 7]
    for run in runs:
        episodes, test_return = run.progress()
        rows.append([run.label, str(run.seed), run.status, f"{episodes}/{run.episodes}",
                     "-" if test_return is None else f"{test_return:.1f}", str(run.attempts),
                     time.strftime("%H:%M:%S", time.gmtime(run.seconds))])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def parse_args(argv=None):
    """-> (args, the train.py flags after `--`). Exits with a message on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s [options] [-- train.py flags]")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS),
                        help="tasks as train.py's --task (default: the paper's six); `all` or `a,b` is "
                             "one multi-task run")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS),
                        help="seeds of each task (default: 0 1 2 3 4)")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="train.py settings to vary, each combination a variant of every task "
                             "and seed, e.g. model=rssm,ssm,gru (default: none)")
    parser.add_argument("--log-dir", default="log", help="root of the sweep, on shared storage under Ray "
                        "(default: log)")
    parser.add_argument("--name", default="sweep",
                        help="the sweep's folder in --log-dir; the same name continues the same sweep "
                             "(default: sweep)")
    parser.add_argument("--max-retries", type=int, default=2,
                        help="times a run that dies is launched again with --resume (default: 2)")
    local = parser.add_argument_group("local mode")
    local.add_argument("--local-workers", type=int, default=1,
                       help="runs at a time on a machine without a GPU, splitting the cores (default: 1)")
    local.add_argument("--runs-per-gpu", type=int, default=1, help="runs at a time on each GPU (default: 1)")
    ray = parser.add_argument_group("Ray mode")
    ray.add_argument("--ray", action="store_true", help="run each training as a Ray task")
    ray.add_argument("--address", help="address of a running Ray cluster (default: start a local Ray)")
    ray.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all; not with --address)")
    ray.add_argument("--cpus-per-run", type=float, default=1.0,
                     help="CPUs Ray reserves for each run (default: 1)")
    ray.add_argument("--gpus-per-run", type=float,
                     help="GPUs Ray reserves for each run, a fraction to share one "
                          "(default: 1 when the cluster has GPUs, else 0)")
    args = parser.parse_args(argv)
    for task in args.tasks:
        try:
            for name in task_list(task):  # `all`, or `a,b`: one multi-task run.
                parse_task(name)
        except ValueError as error:
            parser.error(str(error))
    args.tasks, args.seeds = list(dict.fromkeys(args.tasks)), list(dict.fromkeys(args.seeds))
    if args.max_retries < 0 or min(args.local_workers, args.runs_per_gpu) < 1:
        parser.error("--max-retries must be at least 0, --local-workers and --runs-per-gpu at least 1")
    if not args.ray and any(getattr(args, name) is not None for name in ("address", "num_cpus", "gpus_per_run")):
        parser.error("--address, --num-cpus and --gpus-per-run need --ray")
    if args.address and args.num_cpus is not None:
        parser.error("--num-cpus sizes a local Ray; a cluster at --address has its own")
    set_here = [flag for flag in SET_BY_SWEEP if any(a == flag or a.startswith(flag + "=") for a in extra)]
    if set_here:
        parser.error(f"the sweep sets {', '.join(set_here)} of each run itself; use --tasks and --seeds")
    try:
        args.grid = parse_grid(args.grid, extra)
    except ValueError as error:
        parser.error(str(error))
    return args, extra


def parse_grid(items, extra):
    """`["model=rssm,ssm", ...]` -> {flag name: [values]}, e.g. {"model": ["rssm", "ssm"]}.
    Raises ValueError for a setting that train.py does not have or that cannot vary."""
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(Config)}
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip().replace("_", "-")
        values = [value for value in values.split(",") if value]
        if not values:
            raise ValueError(f"--grid {item}: give KEY=V1,V2,...")
        if key not in fields:
            raise ValueError(f"--grid {item}: train.py has no setting --{key}")
        if key in ("task", "seed") or fields[key].name in RESUME_MAY_CHANGE or fields[key].type is bool:
            raise ValueError(f"--grid {item}: --{key} is not a setting a variant can differ in"
                             f"{'; use --tasks and --seeds' if key in ('task', 'seed') else ''}")
        if key in grid or train_flag(extra, f"--{key}", str) is not None:
            raise ValueError(f"--grid {item}: --{key} is given twice")
        grid[key] = list(dict.fromkeys(values))
    return grid


def train_flag(extra, name, type):
    """The value of one train.py flag among `extra`, or None."""
    flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flag.add_argument(name, type=type)
    return getattr(flag.parse_known_args(extra)[0], name.lstrip("-").replace("-", "_"))


def make_launcher(args, extra):
    if not args.ray:
        device = train_flag(extra, "--device", str) or "auto"
        use_gpus = device == "auto" or device.startswith("cuda")
        return LocalLauncher(local_slots(args.local_workers, args.runs_per_gpu, use_gpus))
    try:
        return RayLauncher(args.address, args.num_cpus, args.cpus_per_run, args.gpus_per_run)
    except (ConnectionError, RuntimeError, ValueError) as error:
        sys.exit(f"error: cannot start or reach Ray: {error}")


def main(argv=None):
    args, extra = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    root = Path(args.log_dir).absolute() / args.name
    variants = [dict(zip(args.grid, values)) for values in itertools.product(*args.grid.values())]
    runs = [Run(task, seed, root / task / variant_name(setting) / f"seed{seed}", setting)
            for task in args.tasks for setting in variants for seed in args.seeds]
    refused = []
    for run in runs:
        config, why = train_config(run, extra)
        if why:
            refused.append((run, why))
        else:
            run.episodes = config.episodes
    if refused:
        run, why = refused[0]
        sys.exit(f"error: train.py refuses the flags of {run.name}"
                 f"{f' and {len(refused) - 1} more runs' if len(refused) > 1 else ''}: {why}")
    for run in runs:
        if run.done_before():
            run.status = "finished"
    todo = [run for run in runs if run.status == "pending"]
    launcher = make_launcher(args, extra)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # A scheduler's kill stops runs as Ctrl-C does.
    logging.info("%d runs in %s, %d finished before; %s", len(runs), root, len(runs) - len(todo),
                 launcher.describe())
    with logging_redirect_tqdm(), tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run",
                                        dynamic_ncols=True) as bar:
        try:
            run_all(todo, launcher, extra, args.max_retries, bar)
        except KeyboardInterrupt:
            sys.exit("interrupted; run the same command again to continue the sweep")
        finally:
            launcher.shutdown()
    print(summary_table(runs))
    failed = [run for run in runs if run.status != "finished"]
    for run in failed:
        logging.error("%s %s: %s (see %s)", run.name, run.status, last_line(run.log), run.log)
    if failed:
        sys.exit(f"error: {len(failed)} of {len(runs)} runs failed")


if __name__ == "__main__":
    main()
