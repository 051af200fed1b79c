"""Evaluate a trained PlaNet run: `python test.py log/cheetah-run/<time>`.

Plays noise-free episodes with the CEM planner, using the run's config and latest checkpoint.
"""
import argparse
import logging
import sys

import numpy as np
import torch

from agent import Agent, planner_policy, play_episode
from train import TEST_SEED_OFFSET, load_run
from utils import resolve_device, set_seed_everywhere
from wrappers import make_env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", help="a run directory written by train.py")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to play")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"environment seed (default: the run's seed + {TEST_SEED_OFFSET})")
    parser.add_argument("--render", action="store_true", help="show the episodes in a window")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    try:
        device = resolve_device(args.device)
        config, model, checkpoint = load_run(args.run_dir, device)
    except ValueError as error:
        sys.exit(f"error: {error}")
    seed = config.seed + TEST_SEED_OFFSET if args.seed is None else args.seed
    set_seed_everywhere(seed)
    env = make_env(config.task, seed, config.action_repeat, config.max_episode_length)
    on_frame = None
    if args.render:
        from viewer import ImageViewer
        try:
            on_frame = ImageViewer(f"PlaNet {config.task}").show
        except RuntimeError as error:
            sys.exit(f"error: {error}")
    logging.info("%s after %d episodes (%d env steps), %d test episodes, seed %d",
                 config.task, checkpoint["counters"]["episodes"], checkpoint["counters"]["env_steps"], args.episodes, seed)
    agent = Agent(model, config.planner, config.bit_depth)
    returns = []
    for i in range(args.episodes):
        episode = play_episode(env, planner_policy(agent), on_frame)
        returns.append(float(episode["reward"].sum()))
        print(f"episode {i + 1}: return {returns[-1]:.1f}", flush=True)
    print(f"mean return {np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
