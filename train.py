"""Train PlaNet from pixels: `python train.py --task cheetah-run`.

Algorithm 1 of the paper: a few seed episodes with random actions, then repeat: C model updates on
chunks sampled from the replay buffer, one episode collected with the CEM planner plus exploration
noise, and every few episodes a noise-free test. Everything goes into `<log-dir>/<task>/<time>/`.
"""
import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agent import Agent, planner_policy, play_episode, random_policy
from model import WorldModel
from utils import (ReplayBuffer, append_jsonl, atomic_write, open_loop_frames,
                   preprocess_observation, resolve_device, save_episode, set_seed_everywhere,
                   write_json)
from wrappers import default_action_repeat, make_env, parse_task

CHECKPOINT = "checkpoint.pt"
TEST_SEED_OFFSET = 10_000  # Test environments never share a seed with training ones.


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Defaults are the official code's (paper Appendix A)."""

    task: str = option("cheetah-run", "dm_control task as domain-task, e.g. cartpole-swingup, cup-catch")
    seed: int = option(0, "seed of the environments, the models and the replay sampling")
    log_dir: str = option("log", "root of the run directories, <log-dir>/<task>/<timestamp>")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    # Schedule.
    episodes: int = option(1000, "total episodes to collect, seed episodes included")
    seed_episodes: int = option(5, "episodes with uniform random actions before training")
    collect_interval: int = option(100, "model updates (C) before each collected episode")
    batch_size: int = option(50, "sequences per update (B)")
    chunk_length: int = option(50, "steps per sequence (L)")
    action_repeat: int = option(0, "physics steps per action; 0: the paper's value for the task")
    max_episode_length: int = option(1000, "environment steps per episode")
    action_noise: float = option(0.3, "std of the Gaussian exploration noise when collecting")
    buffer_capacity: int = option(1_000_000, "agent steps kept in memory for replay")
    # Planner (CEM).
    horizon: int = option(12, "planning horizon (H)")
    iterations: int = option(10, "CEM iterations (I)")
    candidates: int = option(1000, "action sequences per iteration (J)")
    top_candidates: int = option(100, "best sequences the belief is refit to (K)")
    # Evaluation and saving.
    test_interval: int = option(10, "episodes between noise-free tests")
    test_episodes: int = option(10, "episodes per test")
    checkpoint_interval: int = option(1, "episodes between checkpoints (one is also written at the end)")
    # Model.
    belief_size: int = option(200, "GRU belief size (deterministic state h)")
    state_size: int = option(30, "stochastic state size (s)")
    hidden_size: int = option(200, "hidden layer size of the RSSM")
    reward_hidden_size: int = option(300, "hidden layer size of the reward model")
    cnn_depth: int = option(32, "channels of the first conv layer of encoder and decoder")
    # Loss and optimiser.
    bit_depth: int = option(5, "bits per colour channel of the observations")
    free_nats: float = option(3.0, "KL below this many nats is not penalised")
    reward_scale: float = option(10.0, "weight of the reward log-likelihood")
    overshooting_distance: int = option(0, "latent overshooting distance D (0: off, as the paper's agent)")
    overshooting_kl_beta: float = option(1.0, "weight of the latent overshooting KL")
    learning_rate: float = option(1e-3, "Adam learning rate")
    adam_epsilon: float = option(1e-4, "Adam epsilon")
    grad_clip_norm: float = option(1000.0, "global gradient norm clip")

    @property
    def planner(self):
        return {"horizon": self.horizon, "iterations": self.iterations,
                "candidates": self.candidates, "top_candidates": self.top_candidates}


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default,
                            help=f.metadata["help"])
    config = Config(**vars(parser.parse_args(argv)))
    try:
        parse_task(config.task)
    except ValueError as error:
        parser.error(str(error))
    try:
        resolve_device(config.device)
    except ValueError as error:
        parser.error(str(error))
    if config.top_candidates > config.candidates:
        parser.error("--top-candidates must not exceed --candidates")
    if config.chunk_length > config.max_episode_length // (config.action_repeat or 1) + 1:
        parser.error("--chunk-length is longer than an episode")
    config.action_repeat = config.action_repeat or default_action_repeat(config.task)
    return config


def build_model(config, action_size):
    return WorldModel(action_size, config.belief_size, config.state_size, config.hidden_size,
                      config.cnn_depth, config.reward_hidden_size)


# --- Checkpoints: state_dicts and counters, written atomically. ---

def save_checkpoint(run_dir, model, optimizer, counters):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **counters}
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f))


def load_run(run_dir, device):
    """Rebuild a run's config and model from its directory. Raises ValueError with a one-line
    reason when the directory is not a run or its checkpoint does not fit."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json")
    if not (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"{run_dir} has no {CHECKPOINT} yet")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        config = Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{run_dir / 'config.json'} is not a valid config: {error}") from None
    try:
        checkpoint = torch.load(run_dir / CHECKPOINT, map_location=device, weights_only=True)
    except Exception as error:  # A truncated or foreign file fails in many ways.
        raise ValueError(f"{run_dir / CHECKPOINT} is unreadable ({type(error).__name__})") from None
    action_size = make_env(config.task).action_size
    model = build_model(config, action_size).to(device)
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError):
        raise ValueError(f"{run_dir / CHECKPOINT} does not match the model in config.json "
                         f"({config.task}, belief {config.belief_size}, state {config.state_size})") from None
    model.eval()
    return config, model, checkpoint


# --- Training. ---

def update(model, optimizer, buffer, config, device):
    """One gradient step on a batch of chunks. Returns the detached loss terms (no host sync)."""
    obs, actions, rewards = (torch.from_numpy(x).to(device, non_blocking=True)
                             for x in buffer.sample(config.batch_size))
    loss, terms = model.loss(preprocess_observation(obs, config.bit_depth), actions, rewards,
                             config.free_nats, config.reward_scale,
                             config.overshooting_distance, config.overshooting_kl_beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    optimizer.step()
    return terms


def train_model(model, optimizer, buffer, config, device, first_update):
    """C updates; their terms averaged. Stops with an error naming the first non-finite update."""
    model.train()
    start = time.perf_counter()
    history = [update(model, optimizer, buffer, config, device) for _ in range(config.collect_interval)]
    terms = {name: torch.stack([h[name] for h in history]).cpu() for name in history[0]}
    finite = torch.stack(list(terms.values())).isfinite().all(0)
    if not finite.all():
        bad = int((~finite).nonzero()[0])
        values = ", ".join(f"{name} {float(v[bad]):.4g}" for name, v in terms.items())
        raise FloatingPointError(f"non-finite loss at update {first_update + bad}: {values}; "
                                 "the last checkpoint was left as it was")
    metrics = {f"loss/{name}": float(v.mean()) for name, v in terms.items() if name != "grad_norm"}
    metrics["train/grad_norm"] = float(terms["grad_norm"].mean())
    metrics["speed/updates_per_s"] = config.collect_interval / (time.perf_counter() - start)
    model.eval()
    return metrics


def test(model, env, config, first_index, run_dir):
    """Noise-free episodes with the planner, saved from `first_index` on. Returns the metrics and
    a strip of ground truth (top) over open-loop prediction (bottom) for the first episode."""
    agent = Agent(model, config.planner, config.bit_depth)
    episodes = [play_episode(env, planner_policy(agent)) for _ in range(config.test_episodes)]
    for i, episode in enumerate(episodes):
        save_episode(Path(run_dir) / "episodes" / "test", first_index + i, episode)
    returns = np.array([episode["reward"].sum() for episode in episodes])
    truth, prediction = open_loop_frames(model, episodes[0], context=5, length=50,
                                         bit_depth=config.bit_depth)
    strip = np.concatenate([np.concatenate(list(frames[::5]), axis=2) for frames in (truth, prediction)],
                           axis=1)
    return {"test/return": float(returns.mean()), "test/return_std": float(returns.std())}, strip


def make_run_dir(config):
    root = Path(config.log_dir) / config.task
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = root / stamp, 1
    while run_dir.exists():
        run_dir, suffix = root / f"{stamp}-{suffix}", suffix + 1
    run_dir.mkdir(parents=True)
    return run_dir


def hyperparameter_table(config):
    rows = "\n".join(f"| {name} | {value} |" for name, value in dataclasses.asdict(config).items())
    return "| setting | value |\n| --- | --- |\n" + rows


def train(config):
    device = resolve_device(config.device)
    run_dir = make_run_dir(config)
    write_json(run_dir / "config.json", dataclasses.asdict(config))
    logging.info("run directory: %s (device %s)", run_dir, device)
    set_seed_everywhere(config.seed)
    rng = np.random.default_rng(config.seed)
    env = make_env(config.task, config.seed, config.action_repeat, config.max_episode_length)
    test_env = make_env(config.task, config.seed + TEST_SEED_OFFSET, config.action_repeat,
                        config.max_episode_length)
    model = build_model(config, env.action_size).to(device)
    model.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_epsilon)
    buffer = ReplayBuffer(config.chunk_length, config.buffer_capacity, seed=config.seed)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", hyperparameter_table(config))
    agent = Agent(model, config.planner, config.bit_depth)
    counters = {"episodes": 0, "env_steps": 0, "updates": 0, "test_episodes": 0}
    progress = tqdm(total=config.episodes, unit="episode", dynamic_ncols=True)
    while counters["episodes"] < config.episodes:
        metrics = {}
        if counters["episodes"] < config.seed_episodes:
            policy = random_policy(env, rng)
        else:
            metrics = train_model(model, optimizer, buffer, config, device, counters["updates"])
            counters["updates"] += config.collect_interval
            policy = planner_policy(agent, config.action_noise)
        start = time.perf_counter()
        episode = play_episode(env, policy)
        steps = len(episode["reward"]) - 1
        metrics["speed/fps"] = steps * config.action_repeat / (time.perf_counter() - start)
        save_episode(run_dir / "episodes" / "train", counters["episodes"], episode)
        buffer.add(episode)
        counters["episodes"] += 1
        counters["env_steps"] += steps * config.action_repeat
        metrics["train/return"] = float(episode["reward"].sum())
        if counters["episodes"] > config.seed_episodes and counters["episodes"] % config.test_interval == 0:
            test_metrics, strip = test(model, test_env, config, counters["test_episodes"], run_dir)
            counters["test_episodes"] += config.test_episodes
            metrics.update(test_metrics)
            writer.add_image("test/open_loop_prediction", strip, counters["env_steps"])
        for name, value in metrics.items():
            writer.add_scalar(name, value, counters["env_steps"])
        writer.flush()
        append_jsonl(run_dir / "metrics.jsonl", {**counters, **metrics})
        if counters["episodes"] % config.checkpoint_interval == 0 or counters["episodes"] == config.episodes:
            save_checkpoint(run_dir, model, optimizer, counters)
        progress.update(1)
        progress.set_postfix({name.split("/")[0]: round(metrics[name], 1)
                              for name in ("train/return", "test/return") if name in metrics})
    progress.close()
    writer.close()
    logging.info("done: %s", run_dir)
    return run_dir


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_config(argv)
    try:
        train(config)
    except FloatingPointError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the last checkpoint and every finished episode are on disk")


if __name__ == "__main__":
    main()
