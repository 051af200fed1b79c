"""plot.py on run directories written to disk, as a user runs it: a subprocess, files in and out."""
import json
import statistics
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, TINY_FLAGS

TARGET = 30  # Episodes each fake run was asked for; tests every 10.


def plot(*args):
    return subprocess.run([sys.executable, "plot.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def write_run(run_dir, task, seed, reached, test_returns, target=TARGET, seconds_per_episode=None, **settings):
    """A run directory as train.py leaves it: config.json (with `settings`), and one metrics line
    per episode with test/return on the tested episodes (and wall_clock_s if `seconds_per_episode`)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"task": task, "seed": seed, "episodes": target, "action_repeat": 8, "test_interval": 10,
         "test_episodes": 10, "max_episode_length": 1000, **settings}, indent=2))
    lines = []
    for episode in range(1, reached + 1):
        record = {"episodes": episode, "env_steps": 1000 * episode, "updates": 100 * episode,
                  "test_episodes": 10 * (episode // 10), "train/return": float(episode), "speed/fps": 50.0}
        if episode in test_returns:
            record.update({"test/return": test_returns[episode], "test/return_std": 1.0})
        if seconds_per_episode:
            record["wall_clock_s"] = seconds_per_episode * episode
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def runs(tmp_path):
    """Two tasks: cartpole with 3 finished seeds, cheetah with a finished seed and one that died
    after 25 episodes while writing a line. -> the root and the test returns by task and seed."""
    rng = np.random.default_rng(0)
    returns = {}
    for task, seeds in (("cartpole-swingup", 3), ("cheetah-run", 2)):
        for seed in range(seeds):
            tested = {episode: float(rng.uniform(0, 900)) for episode in (10, 20, 30)}
            reached = 25 if (task, seed) == ("cheetah-run", 1) else TARGET
            tested = {e: r for e, r in tested.items() if e <= reached}
            write_run(tmp_path / "log" / task / f"seed{seed}", task, seed, reached, tested)
            returns[task, seed] = tested
    with open(tmp_path / "log" / "cheetah-run" / "seed1" / "metrics.jsonl", "a") as f:
        f.write('{"episodes": 26, "env_st')  # Killed mid-line.
    return tmp_path / "log", returns


def table_rows(text, first_cell):
    """The cells of the Markdown rows whose first cell is `first_cell`."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def assert_valid_png(path, min_width, min_height):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path))
    assert image is not None
    height, width, _ = image.shape
    assert width >= min_width and height >= min_height
    assert image.std() > 10, "the figure is not blank"


@pytest.mark.parametrize("episodes", [30, 25])
def test_table_scores_each_seed_by_its_last_test(runs, tmp_path, episodes):
    root, returns = runs
    out = tmp_path / "plots"
    result = plot(root, "--out", out, "--episodes", episodes)
    assert result.returncode == 0, result.stderr
    assert (out / "scores.md").read_text() == result.stdout
    assert_valid_png(out / "learning_curves.png", 800, 350)
    paper = {"cartpole-swingup": 821, "cheetah-run": 662}
    for task, seeds in (("cartpole-swingup", 3), ("cheetah-run", 2)):
        scores = [returns[task, seed][max(e for e in returns[task, seed] if e <= episodes)]
                  for seed in range(seeds)]
        mean, std = statistics.fmean(scores), statistics.pstdev(scores)
        (row,) = table_rows(result.stdout.split("## Runs")[0], task)
        assert row[1] == f"{mean:.1f} ± {std:.1f}"
        assert row[2] == str(seeds)
        assert row[3] == str(paper[task])
        assert float(row[4]) == pytest.approx(mean - paper[task], abs=0.051)
    assert table_rows(result.stdout, "cartpole-swingup")[0][5] == "3 finished"
    # The seed episodes 1..5 of every fake run return 1..5: random actions score their mean.
    assert table_rows(result.stdout, "cartpole-swingup")[0][6] == "3.0"
    assert table_rows(result.stdout, "cheetah-run")[0][5] == "1 finished, partial 25/30"
    # Two tasks with seeds: their aggregate, the IQM of all 5 scores / 1000 (the middle 3 of 5).
    all_scores = sorted(returns[task, seed][max(e for e in returns[task, seed] if e <= episodes)] / 1000
                        for task, seeds in (("cartpole-swingup", 3), ("cheetah-run", 2)) for seed in range(seeds))
    (row,) = table_rows(result.stdout.split("## Aggregate over tasks")[1], "this port")
    assert row[1:4] == ["2", "5", f"{statistics.fmean(all_scores[1:4]):.3f}"]
    low, high = (float(value) for value in row[4].strip("[]").split(", "))
    assert min(all_scores) <= low <= statistics.fmean(all_scores[1:4]) <= high <= max(all_scores)


def test_partial_runs_are_marked(runs, tmp_path):
    root, returns = runs
    result = plot(root, "--out", tmp_path / "plots", "--episodes", 30)
    assert result.returncode == 0, result.stderr
    rows = {(row[0], row[1]): row for row in table_rows(result.stdout.split("## Runs")[1], "cheetah-run")}
    assert rows["cheetah-run", "0"][2:4] == ["30/30", "finished"]
    assert rows["cheetah-run", "1"][2:4] == ["25/30", "partial"]
    assert rows["cheetah-run", "1"][4] == f"{returns['cheetah-run', 1][20]:.1f} (episode 20)"


def test_run_dirs_and_roots_mix_and_count_once(runs, tmp_path):
    root, _ = runs
    seed0 = root / "cartpole-swingup" / "seed0"
    result = plot(seed0, root / "cartpole-swingup", "--out", tmp_path / "plots", "--episodes", 30)
    assert result.returncode == 0, result.stderr
    (row,) = table_rows(result.stdout.split("## Runs")[0], "cartpole-swingup")
    assert row[2] == "3"
    assert not table_rows(result.stdout, "cheetah-run")
    assert_valid_png(tmp_path / "plots" / "learning_curves.png", 400, 350)


def test_variants_get_a_curve_and_a_row_each(tmp_path):
    """Runs that differ in a setting (here --model, as `sweep.py --grid model=rssm,ssm,gru` makes
    them) are grouped by it; a different seed, --episodes or --device makes no variant. A run
    without the setting in its config (older than it) has the default, rssm."""
    returns = {"rssm": (500.0, 600.0), "ssm": (100.0, 300.0), "gru": (200.0, 220.0)}
    for model, (first, second) in returns.items():
        settings = {} if model == "rssm" else {"model": model}
        write_run(tmp_path / "log" / model / "seed0", "cartpole-swingup", 0, TARGET,
                  {10: 0.0, 20: first, 30: first}, **settings)
        write_run(tmp_path / "log" / model / "seed1", "cartpole-swingup", 1, TARGET + 5,
                  {10: 0.0, 20: second, 30: second}, target=TARGET + 5, device="cpu", **settings)
    out = tmp_path / "plots"
    result = plot(tmp_path / "log", "--out", out, "--episodes", 30)
    assert result.returncode == 0, result.stderr
    tasks = result.stdout.split("## Runs")[0]
    for model, scores in returns.items():
        (row,) = table_rows(tasks, f"cartpole-swingup (model={model})")
        assert row[1:3] == [f"{statistics.fmean(scores):.1f} ± {statistics.pstdev(scores):.1f}", "2"]
    assert len(table_rows(result.stdout.split("## Runs")[1], "cartpole-swingup (model=ssm)")) == 2
    # One colour per variant: blue, orange and green curves (BGR).
    image = cv2.imread(str(out / "learning_curves.png")).astype(int)
    for color in ((180, 119, 31), (14, 127, 255), (44, 160, 44)):
        assert (np.abs(image - color).sum(-1) < 30).sum() > 100, color


def test_unknown_task_has_no_paper_score(tmp_path):
    write_run(tmp_path / "run", "acrobot-swingup", 0, 10, {10: 12.5}, target=10)
    result = plot(tmp_path / "run", "--out", tmp_path / "plots", "--episodes", 10)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout, "acrobot-swingup")[0][1:5] == ["12.5 ± 0.0", "1", "-", "-"]


def bad_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = "not json"
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def foreign_metrics(run_dir):
    (run_dir / "metrics.jsonl").write_text('{"loss": 1.0}\n{"loss": 2.0}\n')


def text_return(run_dir):
    (run_dir / "metrics.jsonl").write_text('{"episodes": 10, "env_steps": 10000, "test/return": "high"}\n')


def bad_config(run_dir):
    (run_dir / "config.json").write_text("{ not json")


def config_without_task(run_dir):
    (run_dir / "config.json").write_text('{"seed": 0, "episodes": 30}')


@pytest.mark.parametrize("damage, message", [
    (bad_metrics, "metrics.jsonl line 2 is not valid JSON"),
    (foreign_metrics, "metrics.jsonl line 1 is not a train.py metrics record"),
    (text_return, "metrics.jsonl line 1 is not a train.py metrics record"),
    (bad_config, "config.json is not a train.py config"),
    (config_without_task, "config.json is not a train.py config"),
])
def test_unreadable_runs_are_refused_in_one_line(runs, tmp_path, damage, message):
    root, _ = runs
    damage(root / "cheetah-run" / "seed0")
    result = plot(root, "--out", tmp_path / "plots")
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda path: None, "error: {} is not a directory"),
    (lambda path: path.mkdir(), "error: no run directory (a folder with config.json) in {}"),
])
def test_no_runs_is_refused_in_one_line(tmp_path, make, message):
    make(tmp_path / "log")
    result = plot(tmp_path / "log", "--out", tmp_path / "plots")
    assert result.returncode != 0
    assert result.stderr.strip() == message.format(tmp_path / "log")
    assert not (tmp_path / "plots").exists()


def test_plots_a_real_training_run(tmp_path):
    """train.py's own files, from a tiny run of 3 episodes tested after the last."""
    run_dir = tmp_path / "log" / "tiny"
    tiny = [*TINY_FLAGS, "--max-episode-length", "80", "--episodes", "3", "--test-episodes", "1",
            "--collect-interval", "2"]
    train = subprocess.run([sys.executable, "train.py", *tiny, "--run-dir", str(run_dir)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = plot(tmp_path / "log", "--out", tmp_path / "plots", "--episodes", 3)
    assert result.returncode == 0, result.stderr
    (row,) = table_rows(result.stdout.split("## Runs")[0], "cartpole-swingup")
    assert row[1:4] == [f"{metrics[-1]['test/return']:.1f} ± 0.0", "1", "821"]
    assert row[5] == "1 finished"
    assert_valid_png(tmp_path / "plots" / "learning_curves.png", 400, 350)


def test_curves_against_the_wall_clock_when_every_run_logs_it(tmp_path):
    import plot as plot_module
    # Seed 0 takes 60 s an episode, seed 1 120 s: tests at 10, 20, 30 episodes.
    for seed, seconds in ((0, 60), (1, 120)):
        write_run(tmp_path / "log" / f"seed{seed}", "cartpole-swingup", seed, TARGET,
                  {10: 100.0 * (seed + 1), 20: 200.0 * (seed + 1), 30: 300.0 * (seed + 1)}, seconds_per_episode=seconds)
    runs = plot_module.read_runs(tmp_path / "log" / "seed1")
    assert [test.wall_clock_s for test in runs[0].tests] == [1200, 2400, 3600]
    both = [run for seed in (0, 1) for run in plot_module.read_runs(tmp_path / "log" / f"seed{seed}")]
    minutes, mean, _ = plot_module.mean_curve(both, "wall_clock_s")
    # Seed 0 at 10, 20, 30 minutes; seed 1 at 20, 40, 60 (from 20 minutes on, linear in between).
    np.testing.assert_allclose(minutes, [10, 20, 30, 40, 60])
    np.testing.assert_allclose(mean, [100, (200 + 200) / 2, (300 + 300) / 2, 400, 600])
    out = tmp_path / "plots"
    result = plot(tmp_path / "log", "--out", out)
    assert result.returncode == 0, result.stderr
    assert_valid_png(out / "learning_curves_wall_clock.png", 400, 300)
    # A run from before train.py logged the wall clock: no such figure, and why.
    write_run(tmp_path / "old" / "seed2", "cartpole-swingup", 2, TARGET, {10: 5.0})
    result = plot(tmp_path / "log", tmp_path / "old", "--out", tmp_path / "mixed")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mixed" / "learning_curves_wall_clock.png").exists()
    assert "some runs do not log wall_clock_s" in result.stderr


def test_interquartile_mean_and_its_stratified_bootstrap():
    import scipy.stats
    from scores import bootstrap_iqm, interquartile_mean
    scores = np.random.default_rng(1).uniform(size=(7, 3))
    assert interquartile_mean(scores) == pytest.approx(scipy.stats.trim_mean(scores, 0.25, axis=None))
    assert interquartile_mean([1, 2, 3, 4, 100, -100, 5, 6]) == pytest.approx(3.5)
    # Redrawing each task's own runs keeps these two tasks' scores: the interval is the point.
    # A bootstrap over the pooled runs would draw 0.1 four times now and then.
    iqm, low, high = bootstrap_iqm({"a": np.array([0.1, 0.1]), "b": np.array([0.9, 0.9])}, np.random.default_rng(0))
    assert (iqm, low, high) == pytest.approx((0.5, 0.5, 0.5))
    iqm, low, high = bootstrap_iqm({"a": np.array([0.1, 0.3, 0.5]), "b": np.array([0.6, 0.9, 0.7])},
                                   np.random.default_rng(0))
    assert low < iqm < high


def test_published_points_where_the_curves_reach_them(tmp_path):
    import matplotlib.pyplot as plt
    import plot as plot_module
    # 120 episodes of 1000 steps: past 100k steps, not 500k.
    write_run(tmp_path / "run", "cartpole-swingup", 0, 120, {10: 100.0, 120: 300.0}, target=120, seconds_per_episode=60)
    runs = plot_module.group_by_task(plot_module.read_runs(tmp_path / "run"))
    figure, ax = plt.subplots()
    plot_module.plot_task(ax, "cartpole-swingup", runs["cartpole-swingup"], {"": "tab:blue"}, "env_steps")
    labels = ax.get_legend_handles_labels()[1]
    assert "PlaNet, CURL Table 1: 297 ± 39 at 100k" in labels
    figure, ax = plt.subplots()
    plot_module.plot_task(ax, "cartpole-swingup", runs["cartpole-swingup"], {"": "tab:blue"}, "wall_clock_s")
    assert not any("CURL" in label for label in ax.get_legend_handles_labels()[1])


def test_the_published_pixel_scores_are_not_drawn_beside_runs_from_states(tmp_path):
    import matplotlib.pyplot as plt
    import plot as plot_module
    write_run(tmp_path / "run", "cartpole-swingup", 0, 120, {10: 100.0, 120: 300.0}, target=120, obs="state")
    runs = plot_module.group_by_task(plot_module.read_runs(tmp_path / "run"))
    figure, ax = plt.subplots()
    plot_module.plot_task(ax, "cartpole-swingup", runs["cartpole-swingup"], {"": "tab:blue"}, "env_steps")
    labels = ax.get_legend_handles_labels()[1]
    assert not any("paper" in label or "CURL" in label for label in labels), labels
    assert any(label.startswith("random actions") for label in labels)
