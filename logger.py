"""What a run shows while it trains, besides its metrics.jsonl: the progress bar over its
episodes, the config in TensorBoard, and Weights & Biases (`--wandb`).
"""
import dataclasses
import os
import secrets
import sys

from tqdm import tqdm

from utils import atomic_write


class EpisodeProgress:
    """The bar over the run's episodes, moved inside each iteration too: by the updates done out of
    C, then by the episode's steps. Its rate and ETA then count the updates from the first one on,
    where a bar moved once per episode projects from the seed episodes, which have none (on a CPU
    at the paper's settings: about an hour, for weeks). An update moves it by `share / C` of an
    episode and a step by the rest over the episode's steps, `share` being the part of the last
    iteration's time that its updates took (a half before the first is measured)."""

    def __init__(self, total, done):
        # Into a file (nohup, sweep.py's train.log) a line every 30 s, not one per step and update.
        self.bar = tqdm(total=total, initial=done, unit="episode", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 30,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self.steps_per_episode = 1
        self.share, self.current_share, self.steps = 0.5, 0.0, 0
        self.status = {}

    def start(self, with_updates, steps_per_episode):
        """An iteration starts: with updates or not, then an episode of `steps_per_episode` frames."""
        self.current_share, self.steps = (self.share if with_updates else 0.0), 0
        self.steps_per_episode = steps_per_episode

    def advance(self, episodes):
        """Move by a fraction of an episode; float sums must not pass the total (tqdm warns)."""
        self.bar.update(min(episodes, self.bar.total - self.bar.n))

    def updated(self, done, count):
        self.bar.set_postfix({**self.status, "update": f"{done}/{count}"}, refresh=False)
        self.advance(self.current_share / count)

    def stepped(self, _obs):
        self.steps += 1
        decisions = self.steps_per_episode - 1
        self.bar.set_postfix({**self.status, "step": f"{min(self.steps - 1, decisions)}/{decisions}"}, refresh=False)
        if self.steps <= self.steps_per_episode:
            self.advance((1 - self.current_share) / self.steps_per_episode)

    def finish(self, episodes, status, update_seconds=0.0, episode_seconds=0.0):
        """An episode ended: the bar at `episodes` exactly, `status` shown until the next ends."""
        if update_seconds:
            self.share = update_seconds / (update_seconds + episode_seconds)
        self.status = status
        self.bar.n = episodes
        self.bar.set_postfix(status)

    def close(self):
        self.bar.close()


def hyperparameter_table(config):
    """The config as a Markdown table, for TensorBoard's Text tab."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in dataclasses.asdict(config).items())
    return "| setting | value |\n| --- | --- |\n" + rows


def start_wandb(config, run_dir):
    """A Weights & Biases run that gets the config and everything the SummaryWriter writes (scalars,
    images, text), through W&B's TensorBoard patch. A resumed run continues the same W&B run: its id
    is kept in RUN_DIR/wandb_id. Raises ValueError without the wandb package."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    id_path = run_dir / "wandb_id"
    run_id = id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(4)
    atomic_write(id_path, lambda f: f.write(run_id.encode()))
    # save=False: W&B would otherwise copy the event files into RUN_DIR/wandb, inside the very
    # folder it watches, and copy its copies.
    wandb.tensorboard.patch(root_logdir=str(run_dir), save=False)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "planet-torch"), id=run_id, resume="allow",
                      name=f"{config.task}/{run_dir.name}", dir=run_dir, config=dataclasses.asdict(config))
