"""The scores table of plot.py (scores.md): per task the score after N episodes over seeds beside
the paper's, the aggregate over tasks (interquartile mean with a stratified-bootstrap interval,
Agarwal et al. 2021), and every run with the episodes it reached.
"""
import numpy as np

from wrappers import GYM_PREFIX

# Table 1 of the paper: PlaNet after 1000 episodes (5 seeds x 10 test episodes) and D4PG from pixels
# after 100,000 episodes. The order is the paper's.
PAPER_SCORES = {
    "cartpole-swingup": {"PlaNet": 821, "D4PG": 862},
    "reacher-easy": {"PlaNet": 832, "D4PG": 967},
    "cheetah-run": {"PlaNet": 662, "D4PG": 524},
    "finger-spin": {"PlaNet": 700, "D4PG": 985},
    "cup-catch": {"PlaNet": 930, "D4PG": 980},
    "walker-walk": {"PlaNet": 951, "D4PG": 968},
}
# A dm_control episode's return lies in [0, 1000] (a reward in [0, 1] per env step, 1000 steps): the
# normalisation of the aggregate score, as Agarwal et al. (2021) use for the Control Suite.
MAX_RETURN = 1000
BOOTSTRAP_SAMPLES = 2000


def random_level(runs):
    """Mean return of the runs' seed episodes (uniform random actions), or None."""
    returns = [r for run in runs for r in run.random_returns]
    return float(np.mean(returns)) if returns else None


def all_runs(by_task):
    return [run for variants in by_task.values() for runs in variants.values() for run in runs]


def named(task, variant):
    return f"{task} ({variant})" if variant else task


def score_row(task, variant, runs, episodes):
    scores = [score for run in runs if (score := run.score(episodes))]
    returns = np.array([r for _, r in scores])
    paper = PAPER_SCORES.get(task, {}).get("PlaNet")
    mean = f"{returns.mean():.1f} ± {returns.std():.1f}" if scores else "-"
    difference = f"{returns.mean() - paper:+.1f}" if scores and paper is not None else "-"
    finished = sum(run.finished for run in runs)
    status = [f"{finished} finished"] * bool(finished) + [
        f"partial {run.reached}/{run.target}" for run in runs if not run.finished]
    random = random_level(runs)
    return [named(task, variant), mean, str(len(scores)), "-" if paper is None else str(paper), difference, ", ".join(status),
            "-" if random is None else f"{random:.1f}"]


def run_row(run, episodes):
    score = run.score(episodes)
    return [named(run.task, run.variant), str(run.seed), f"{run.reached}/{run.target}", "finished" if run.finished else "partial",
            f"{score[1]:.1f} (episode {score[0]})" if score else "-", str(run.path)]


def markdown_table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def interquartile_mean(scores):
    """The mean of the middle half of `scores` (any shape), a quarter cut from each end, as
    `scipy.stats.trim_mean(scores, 0.25)` and rliable's IQM compute it."""
    flat = np.sort(np.ravel(scores))
    cut = int(0.25 * len(flat))
    return float(flat[cut:len(flat) - cut].mean())


def bootstrap_iqm(scores_by_task, rng, samples=BOOTSTRAP_SAMPLES):
    """-> (IQM of every task's scores together, the 2.5th and 97.5th percentiles of the IQM over a
    stratified bootstrap): each sample redraws every task's runs with replacement, task by task."""
    tasks = list(scores_by_task.values())
    draws = [interquartile_mean(np.concatenate([rng.choice(scores, len(scores)) for scores in tasks]))
             for _ in range(samples)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return interquartile_mean(np.concatenate(tasks)), float(low), float(high)


def aggregate_rows(by_task, episodes):
    """Rows of the aggregate table: each variant with scores on two or more dm_control tasks and two
    or more seeds of some task. Gymnasium tasks have no common scale and are left out."""
    by_variant = {}
    for task, variants in by_task.items():
        if task.startswith(GYM_PREFIX):
            continue
        for variant, runs in variants.items():
            scores = [score[1] / MAX_RETURN for run in runs if (score := run.score(episodes))]
            if scores:
                by_variant.setdefault(variant, {})[task] = np.array(scores)
    rng = np.random.default_rng(0)
    rows = []
    for variant, scores in by_variant.items():
        if len(scores) >= 2 and max(map(len, scores.values())) >= 2:
            iqm, low, high = bootstrap_iqm(scores, rng)
            rows.append([variant or "this port", str(len(scores)), str(sum(map(len, scores.values()))),
                         f"{iqm:.3f}", f"[{low:.3f}, {high:.3f}]"])
    return rows


def score_report(by_task, episodes):
    """The Markdown of scores.md: the per-task table, the aggregate over tasks when there are
    several, then the per-run table."""
    tasks = markdown_table(
        ["task", f"score after {episodes} episodes", "seeds", "PlaNet (paper)", "difference", "runs",
         "random actions"],
        [score_row(task, variant, runs, episodes)
         for task, variants in by_task.items() for variant, runs in variants.items()])
    runs = markdown_table(["task", "seed", "episodes", "status", "score used", "run directory"],
                          [run_row(run, episodes) for run in all_runs(by_task)])
    return (f"## Scores after {episodes} episodes\n\n"
            "Mean ± std over seeds (std with ddof 0) of each seed's last test at or before "
            f"{episodes} episodes; the paper's PlaNet score is the mean of 5 seeds x 10 test episodes; "
            "random actions is the mean return of the runs' seed episodes.\n\n"
            f"{tasks}\n\n{aggregate_report(by_task, episodes)}## Runs\n\n{runs}\n")


def aggregate_report(by_task, episodes):
    rows = aggregate_rows(by_task, episodes)
    if not rows:
        return ""
    table = markdown_table(["variant", "tasks", "runs", "IQM of normalised scores", "95% CI"], rows)
    return ("## Aggregate over tasks\n\n"
            f"Interquartile mean of the scores after {episodes} episodes over every task and seed, each "
            f"normalised by {MAX_RETURN} (the most a Control Suite episode can score), with a 95% interval "
            f"from {BOOTSTRAP_SAMPLES} stratified bootstrap samples (each redraws every task's seeds with "
            "replacement; percentiles), as Agarwal et al. (2021, Deep RL at the Edge of the Statistical "
            "Precipice) recommend. Gymnasium tasks are left out: their returns have no common scale.\n\n"
            f"{table}\n\n")
