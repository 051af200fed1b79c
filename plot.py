"""Plot learning curves and tabulate final scores: `python plot.py log/sweep [--out plots] [--episodes 1000]`.

Reads any number of runs written by train.py (each argument is a run directory or a folder searched
recursively for them) and writes, under `--out`:

- `learning_curves.png`: test return against environment steps, one panel per task, the mean over
  seeds with a band of one standard deviation, every seed as a thin line, the paper's PlaNet and
  D4PG scores as dashed lines, the published PlaNet at 100k and 500k steps (CURL, Table 1) as
  points where the curves reach them (these from pixels, so beside runs from pixels only), and the
  return of random actions (the seed episodes) as a dotted line;
- `learning_curves_wall_clock.png`: the same against the wall clock of training (`wall_clock_s` of
  metrics.jsonl), when every run logs it;
- `scores.md` (also printed): per task, the score after `--episodes` episodes as mean +- std over
  seeds, where a seed's score is its last test at or before that many episodes, next to the
  paper's PlaNet score and the random actions' return; with several dm_control tasks and seeds,
  the interquartile mean of the normalised scores with a stratified-bootstrap interval (Agarwal et
  al. 2021); then every run with the episodes it reached out of its target.

Runs of a task whose settings differ (e.g. a sweep with `--grid model=rssm,ssm,gru`) are variants:
each gets its own curve and row, named by the settings that differ, such as `model=ssm`.
A multi-task run (Figure 6) gives each of its tasks a curve, against that task's own episodes and
env steps, beside the single-task runs of the task: the variant `agent=multi-task (...)`.

Runs still training or that died are included up to where they got and marked `partial`.
"""
import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

from config import SPEED_PATHS, Config
from scores import PAPER_SCORES, all_runs, random_level, score_report
from wrappers import default_action_repeat, task_list

# The published PlaNet by environment steps, mean ± std: CURL (Srinivas et al. 2020), Table 1,
# which reran the official code at 100k and 500k steps.
PUBLISHED = {
    "cartpole-swingup": {100_000: (297, 39), 500_000: (475, 71)},
    "reacher-easy": {100_000: (20, 50), 500_000: (210, 390)},
    "cheetah-run": {100_000: (138, 88), 500_000: (305, 131)},
    "finger-spin": {100_000: (136, 216), 500_000: (561, 284)},
    "cup-catch": {100_000: (0, 0), 500_000: (460, 380)},
    "walker-walk": {100_000: (224, 48), 500_000: (351, 58)},
}
NUMBERS = ("episodes", "env_steps", "test/return", "wall_clock_s")  # The fields of metrics.jsonl that plot.py reads.
BASELINE_STYLE = {"PlaNet": ("tab:red", "PlaNet, paper (1000 episodes)"),
                  "D4PG": ("tab:gray", "D4PG, paper (pixels, 100k episodes)")}
# Settings that tell runs apart without changing the method: never what makes a variant.
NOT_A_VARIANT = ("seed", "log_dir", "device", "episodes", "nan_policy", "compile_planner",
                 "checkpoint_interval", *SPEED_PATHS, "wandb")
VARIANT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan")


class Test(NamedTuple):
    episodes: int
    env_steps: int
    test_return: float
    wall_clock_s: float | None  # Seconds of training so far; None in a run from before it was logged.


# The x-axes of the curves: {name: (label, tick formatter, scale from the field)}.
AXES = {"env_steps": ("environment steps (action repeat included)", "steps", 1),
        "wall_clock_s": ("wall clock of training (minutes; tests included)", None, 1 / 60)}


@dataclass
class Run:
    """What plot.py needs of one run directory."""

    path: Path
    task: str
    seed: int
    target: int  # The episodes the run was asked for (config.json).
    reached: int = 0  # The episodes it has logged.
    tests: list = field(default_factory=list)  # `Test`s, in order.
    random_returns: list = field(default_factory=list)  # Of the seed episodes: uniform random actions.
    settings: dict = field(default_factory=dict)  # config.json, with the defaults of settings it lacks.
    variant: str = ""  # The settings that set it apart from the task's other runs, e.g. "model=ssm".

    @property
    def finished(self):
        return self.reached >= self.target

    def score(self, episodes):
        """(episodes, return) of the last test at or before `episodes`, or None."""
        done = [(test.episodes, test.test_return) for test in self.tests if test.episodes <= episodes]
        return done[-1] if done else None


# --- Reading runs. Each raises ValueError with a one-line reason. ---

def find_run_dirs(paths):
    """Run directories (those holding a config.json) given directly or found under `paths`."""
    found = {}
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(f"{name} is not a directory")
        configs = [path / "config.json"] if (path / "config.json").is_file() else sorted(path.rglob("config.json"))
        if not configs:
            raise ValueError(f"no run directory (a folder with config.json) in {name}")
        for config in configs:
            found.setdefault(config.parent.resolve(), config.parent)  # A run given twice counts once.
    return list(found.values())


def read_metrics(path):
    """The records of a metrics.jsonl. A torn last line (a run killed while writing) is dropped;
    any other bad line is an error."""
    if not path.is_file():
        return []  # The run has not finished its first episode yet.
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path} line {number} is not valid JSON") from None
        if not (isinstance(record, dict) and {"episodes", "env_steps"} <= record.keys()
                and all(isinstance(record.get(key, 0), (int, float)) for key in NUMBERS)):
            raise ValueError(f"{path} line {number} is not a train.py metrics record "
                             "(it needs numbers for episodes and env_steps)")
        records.append(record)
    return records


def read_runs(run_dir):
    """The `Run` of a run directory, or one per task of a multi-task run."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        tasks, seed, target = task_list(config["task"]), int(config["seed"]), int(config["episodes"])
        seed_episodes = int(config.get("seed_episodes", 5)) * len(tasks)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{path} is not a train.py config ({type(error).__name__}: {error})") from None
    records = read_metrics(run_dir / "metrics.jsonl")
    settings = {**dataclasses.asdict(Config()), **config, "agent": "single-task"}
    if len(tasks) == 1:
        tests = [Test(r["episodes"], r["env_steps"], r["test/return"], r.get("wall_clock_s"))
                 for r in records if "test/return" in r]
        random_returns = [r["train/return"] for r in records
                          if r["episodes"] <= seed_episodes and "train/return" in r]
        return [Run(run_dir, tasks[0], seed, target, records[-1]["episodes"] if records else 0, tests,
                    random_returns, settings)]
    runs = []
    for task in tasks:  # Its own episodes (the tasks take turns) and env steps.
        episodes, tests, random_returns = 0, [], []
        for r in records:
            if f"train/return/{task}" in r:
                episodes += 1
                if r["episodes"] <= seed_episodes:
                    random_returns.append(r[f"train/return/{task}"])
            if f"test/return/{task}" in r:
                tests.append(Test(episodes, r.get(f"env_steps/{task}", 0), r[f"test/return/{task}"],
                                  r.get("wall_clock_s")))
        runs.append(Run(run_dir, task, seed, len(range(tasks.index(task), target, len(tasks))), episodes, tests,
                        random_returns, {**settings, "task": task,
                                         "action_repeat": config.get("action_repeat") or default_action_repeat(task),
                                         "agent": f"multi-task ({config['task']})"}))
    return runs


def group_by_task(runs):
    """{task: {variant: its runs by seed}}, the paper's tasks first in the paper's order, each
    task's runs named by `name_variants`."""
    order = {task: i for i, task in enumerate(PAPER_SCORES)}
    tasks = sorted({run.task for run in runs}, key=lambda task: (order.get(task, len(order)), task))
    grouped = {}
    for task in tasks:
        task_runs = name_variants([run for run in runs if run.task == task])
        grouped[task] = {variant: sorted((run for run in task_runs if run.variant == variant),
                                         key=lambda run: (run.seed, str(run.path)))
                         for variant in sorted({run.variant for run in task_runs})}
    return grouped


def name_variants(runs):
    """Set each run's `variant` to the settings in which the runs differ, as `key=value, ...`
    (empty when they all agree). -> the runs."""
    keys = sorted({key for run in runs for key in run.settings} - set(NOT_A_VARIANT))
    differing = [key for key in keys if len({json.dumps(run.settings.get(key)) for run in runs}) > 1]
    for run in runs:
        run.variant = ", ".join(f"{key}={run.settings.get(key)}" for key in differing)
    return runs


# --- The figure. ---

def curve(run, axis):
    """(x, test returns) of a run's tests, x on `axis` (AXES)."""
    return (np.array([getattr(test, axis) for test in run.tests], float) * AXES[axis][2],
            np.array([test.test_return for test in run.tests]))


def mean_curve(runs, axis="env_steps"):
    """Mean and std of test return over runs that have tests, on the union of their test x.
    A run counts only between its first and last test (linear in between): a run that stopped
    early is never extrapolated, the mean goes on with the others."""
    steps = np.unique(np.concatenate([curve(run, axis)[0] for run in runs]))
    values = np.full((len(runs), len(steps)), np.nan)
    for i, run in enumerate(runs):
        x, y = curve(run, axis)
        inside = (steps >= x[0]) & (steps <= x[-1])
        values[i, inside] = np.interp(steps[inside], x, y)
    return steps, np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def steps_label(value, _position):
    """Tick labels as 250k, 1M, 1.5M."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    return f"{value / 1e3:g}k" if abs(value) >= 1e3 else f"{value:g}"


def plot_variant(ax, runs, color, name, axis):
    """The mean ± std curve of one variant's runs, each seed thin, an x at each partial run's end."""
    tested = [run for run in runs if run.tests]
    if not tested:
        return
    steps, mean, std = mean_curve(tested, axis)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.plot(steps, mean, color=color, linewidth=2,
            label=f"{name}: mean ± std of {len(tested)} seed{'s' * (len(tested) > 1)}")
    for run in tested:
        ax.plot(*curve(run, axis), color=color, linewidth=0.6, alpha=0.4)
    for run in tested:
        if not run.finished:
            x, y = curve(run, axis)
            ax.plot(x[-1], y[-1], "x", color="black", markersize=7)


def plot_task(ax, task, variants, colors, axis):
    runs = [run for runs in variants.values() for run in runs]
    for variant, variant_runs in variants.items():
        plot_variant(ax, variant_runs, colors[variant], variant or "this port", axis)
    if not any(run.tests for run in runs):
        ax.text(0.5, 0.5, "no test yet", transform=ax.transAxes, ha="center", va="center")
    if any(run.tests and not run.finished for run in runs):
        ax.plot([], [], "x", color="black", label="last test of a partial run")
    # The published scores are from pixels: drawn beside runs from pixels only.
    from_pixels = any(run.settings.get("obs", "pixels") == "pixels" for run in runs)
    if axis == "env_steps" and from_pixels:  # The published points that the curves reach.
        reached = max((test.env_steps for run in runs for test in run.tests), default=0)
        points = [(steps, mean, std) for steps, (mean, std) in PUBLISHED.get(task, {}).items() if steps <= reached]
        if points:
            steps, means, stds = zip(*points)
            ax.errorbar(steps, means, yerr=stds, fmt="D", color="tab:red", capsize=4, markersize=5,
                        label="PlaNet, CURL Table 1: " + ", ".join(f"{m} ± {s} at {steps_label(x, None)}"
                                                                   for x, m, s in points))
    for method, score in PAPER_SCORES.get(task, {}).items() if from_pixels else ():
        color, label = BASELINE_STYLE[method]
        ax.axhline(score, color=color, linestyle="--", linewidth=1.2, label=f"{label}: {score}")
    if (level := random_level(runs)) is not None:
        ax.axhline(level, color="black", linestyle=":", linewidth=1.2,
                   label=f"random actions (seed episodes): {level:.0f}")
    ax.set_title(f"{task} ({len(runs)} run{'s' * (len(runs) > 1)})")
    label, ticks, _ = AXES[axis]
    ax.set_xlabel(label)
    ax.set_ylabel("test return (mean of noise-free episodes)")
    if ticks == "steps":
        ax.xaxis.set_major_formatter(FuncFormatter(steps_label))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def plot_curves(by_task, path, axis="env_steps"):
    columns = min(3, len(by_task))
    rows = -(-len(by_task) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False,
                                layout="constrained")
    # A variant keeps its colour in every panel; thin lines are single seeds.
    names = list(dict.fromkeys(variant for variants in by_task.values() for variant in variants))
    colors = {name: VARIANT_COLORS[i % len(VARIANT_COLORS)] for i, name in enumerate(names)}
    for ax, (task, variants) in zip(axes.flat, by_task.items()):
        plot_task(ax, task, variants, colors, axis)
    for ax in axes.flat[len(by_task):]:
        ax.set_visible(False)
    figure.suptitle(f"PlaNet learning curves: test return against {AXES[axis][0].split(' (')[0]}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("log_dirs", nargs="+", metavar="LOG_DIR",
                        help="run directories, or folders searched recursively for them")
    parser.add_argument("--out", default="plots", help="folder for learning_curves.png and scores.md")
    parser.add_argument("--episodes", type=int, default=1000,
                        help="score each seed by its last test at or before this many episodes "
                             "(the paper: 1000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    try:
        by_task = group_by_task([run for run_dir in find_run_dirs(args.log_dirs) for run in read_runs(run_dir)])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = score_report(by_task, args.episodes)
        (out / "scores.md").write_text(report)
        written = [out / "learning_curves.png", out / "scores.md"]
        plot_curves(by_task, written[0])
        tests = [test for run in all_runs(by_task) for test in run.tests]
        if tests and all(test.wall_clock_s is not None for test in tests):
            written.append(out / "learning_curves_wall_clock.png")
            plot_curves(by_task, written[-1], "wall_clock_s")
        elif tests:
            logging.info("no wall-clock curves: some runs do not log wall_clock_s (train.py before it did)")
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(report, end="")
    logging.info("wrote %s", ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
