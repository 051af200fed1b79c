"""Evaluate a trained PlaNet run: `python test.py log/cheetah-run/<time>`.

Plays noise-free episodes with the CEM planner, using the run's config and latest checkpoint.
Up to `--parallel` episodes run together: one env per worker process, and one batched CEM call
for all of their beliefs at every step. `--random` plays uniform random actions on the same
episodes instead: the baseline that the planner's returns are compared with. `--video` writes
them as an MP4 (or a GIF with `--gif`), the episodes played at once side by side. A multi-task run
plays each of its tasks, or the one that `--task` names, and writes a video per task.
"""
import argparse
import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from agent import Agent, RandomAgent, episode_frames, play_episodes
from config import read_config
from runs import build_env, load_run, padded_action_size, test_seeds
from utils import keep_freed_memory, resolve_device, set_seed_everywhere
from video import episode_mosaic, write_gif, write_video
from wrappers import make_parallel_envs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", help="a run directory written by train.py")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to play")
    parser.add_argument("--parallel", type=int, default=10, help="episodes played at the same time")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the test episodes (default: the run's seed, whose first "
                             "episodes start where those of the run's first test did)")
    parser.add_argument("--random", action="store_true",
                        help="uniform random actions instead of the planner, on the same episodes")
    parser.add_argument("--render", action="store_true", help="show the episodes in a window")
    parser.add_argument("--video", action="store_true",
                        help="write the episodes as an MP4, those played at once side by side")
    parser.add_argument("--gif", action="store_true", help="with --video: an animated GIF instead")
    parser.add_argument("--out", default=None,
                        help="with --video: its path (default: RUN_DIR/test_episodes.mp4, or .gif)")
    parser.add_argument("--task", default=None, help="of a multi-task run: play this task only")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.parallel < 1:
        parser.error("--episodes and --parallel must be at least 1")
    if (args.gif or args.out) and not args.video:
        parser.error("--gif and --out go with --video")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    keep_freed_memory()
    try:
        device = resolve_device(args.device)
        if args.random:  # Needs the run's config only, not its model.
            config, model, checkpoint = read_config(args.run_dir), None, None
        else:
            config, model, checkpoint = load_run(args.run_dir, device)
        tasks = config.tasks if args.task is None else [args.task]
        if not set(tasks) <= set(config.tasks):
            raise ValueError(f"the run's tasks are {', '.join(config.tasks)}, not {args.task}")
        frames = args.video or args.render  # From states, frames rendered beside them.
        if frames and config.obs == "state":
            with contextlib.closing(build_env(config, frames=True)):
                pass  # Raises ValueError when the env cannot render.
    except ValueError as error:
        sys.exit(f"error: {error}")
    multi, action_size = len(config.tasks) > 1, padded_action_size(config)
    seed = config.seed if args.seed is None else args.seed
    set_seed_everywhere(seed)
    on_frames = None
    if args.render:
        from viewer import ImageViewer
        try:
            on_frames = ImageViewer(f"PlaNet {config.task}").show
        except RuntimeError as error:
            sys.exit(f"error: {error}")
    if args.random:
        logging.info("%s with uniform random actions, %d test episodes, seed %d",
                     config.task, args.episodes, seed)
    else:
        logging.info("%s after %d episodes (%d env steps), %d test episodes, seed %d",
                     config.task, checkpoint["counters"]["episodes"], checkpoint["counters"]["env_steps"],
                     args.episodes, seed)
    parallel = min(args.parallel, args.episodes)
    means = []
    for task in tasks:
        # Task k of a multi-task run starts where the run's tests did: after k tasks' episodes.
        first_seed = config.tasks.index(task) * args.episodes
        with contextlib.closing(make_parallel_envs(task, parallel, config.repeat_of(task), config.max_episode_length,
                                                   config.obs, frames, action_size)) as envs:
            returns, video = play(envs, model, config, args, seed, first_seed, on_frames, device)
        name = f"{task}: " if multi else ""
        print(f"{name}mean return {np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes",
              flush=True)
        means.append(np.mean(returns))
        if args.video:
            out = Path(args.out or Path(args.run_dir) / f"test_episodes.{'gif' if args.gif else 'mp4'}")
            out = out.with_stem(f"{out.stem}_{task}") if multi else out
            (write_gif if args.gif else write_video)(out, video)
            print(out)
    if len(tasks) > 1:
        print(f"mean over the {len(tasks)} tasks: {np.mean(means):.1f}")


def play(envs, model, config, args, seed, first_seed, on_frames, device):
    """`args.episodes` episodes in rounds of the parallel `envs` -> their returns (printed as they
    end) and, with --video, the frames of each round's episodes side by side."""
    parallel = envs.num_envs
    if args.random:
        agent = RandomAgent(envs.single_action_space.shape[0], np.random.default_rng(seed), parallel)
    else:
        agent = Agent(model, config.planner, config.bit_depth, batch_size=parallel, plan=config.plan(device))
    returns, video = [], []
    for first in range(0, args.episodes, parallel):
        # The last round may need fewer episodes; its spare envs play and are left out.
        episodes = play_episodes(envs, agent, test_seeds(seed, first_seed + first, parallel), on_frames)
        for episode in episodes[:args.episodes - first]:
            returns.append(float(episode["reward"].sum()))
            print(f"episode {len(returns)}: return {returns[-1]:.1f}", flush=True)
        if args.video:  # Each round's episodes in a row, the rounds one after the other.
            shown = episodes[:args.episodes - first]
            video += episode_mosaic([episode_frames(episode) for episode in shown], tiles=parallel)
    return returns, video


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
