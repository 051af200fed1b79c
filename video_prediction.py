"""Video of open-loop prediction: `python video_prediction.py log/cheetah-run/<time>`.

Plays one noise-free episode with the planner, lets the model observe the first `--context`
frames, then predicts the following frames open loop from the executed actions. Writes an MP4 of
ground truth | prediction | difference, or with `--gif` an animated GIF (for a README).
A run from states (`--obs state`) predicts observation vectors: it writes a PNG plot of each
dimension, true against predicted (`--plot`), and a video of the true frames where the env renders.
A multi-task run writes one video per task, its name after the file's, or that of `--task`.
"""
import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from agent import Agent, episode_frames, planner_policy, play_episode
from diagnostics import open_loop_prediction
from runs import build_env, load_run, padded_action_size, test_seeds
from utils import keep_freed_memory, load_episode, resolve_device, set_seed_everywhere
from video import state_plot, write_gif, write_video
from wrappers import state_labels

SCALE = 4  # Each 64x64 frame is shown at 256x256.


def panel(frame, label):
    """`(3, 64, 64)` RGB uint8 -> enlarged BGR image with a label."""
    image = cv2.cvtColor(np.ascontiguousarray(frame.transpose(1, 2, 0)), cv2.COLOR_RGB2BGR)
    image = cv2.resize(image, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
    cv2.putText(image, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def video_frames(truth, prediction, context):
    """Frames `(T, 3, 64, 64)` uint8 -> BGR images of ground truth | prediction | difference."""
    difference = np.abs(truth.astype(np.int16) - prediction.astype(np.int16)).astype(np.uint8)
    for t in range(len(truth)):
        mode = "observed" if t < context else "open loop"
        yield np.concatenate([panel(truth[t], f"truth t={t}"), panel(prediction[t], mode),
                              panel(difference[t], "difference")], axis=1)


def observed_frames(frames, context):
    """Frames `(T, 3, 64, 64)` uint8 of a run from states -> BGR images of the ground truth alone."""
    for t in range(len(frames)):
        yield panel(frames[t], f"truth t={t}, {'observed' if t < context else 'predicted open loop'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", help="a run directory written by train.py")
    parser.add_argument("--out", default=None,
                        help="video path (default: RUN_DIR/video_prediction.mp4, or .gif with --gif)")
    parser.add_argument("--gif", action="store_true", help="write an animated GIF instead of an MP4")
    parser.add_argument("--plot", default=None,
                        help="from states: the plot's path (default: RUN_DIR/state_prediction.png)")
    parser.add_argument("--context", type=int, default=5, help="frames observed before predicting")
    parser.add_argument("--length", type=int, default=45, help="frames predicted open loop")
    parser.add_argument("--episode", default=None,
                        help="an episode .npz to use instead of playing a new one with the planner")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the test episode (default: the run's seed, whose first "
                             "episode starts where that of the run's first test did)")
    parser.add_argument("--task", default=None, help="of a multi-task run: this task only")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    keep_freed_memory()
    if args.context < 1 or args.length < 1:
        parser.error("--context and --length must be positive")
    try:
        device = resolve_device(args.device)
        config, model, _ = load_run(args.run_dir, device)
        if args.task is not None and args.task not in config.tasks:
            raise ValueError(f"the run's tasks are {', '.join(config.tasks)}, not {args.task}")
    except ValueError as error:
        sys.exit(f"error: {error}")
    seed = config.seed if args.seed is None else args.seed
    set_seed_everywhere(seed)
    tasks = [args.task] if args.task else config.tasks[:1] if args.episode else config.tasks
    for task in tasks:
        predict(model, config, args, task, seed, device, suffix=f"_{task}" if len(tasks) > 1 else "")


def predict(model, config, args, task, seed, device, suffix):
    """The video (and from states the plot) of one task, its files' names ending with `suffix`."""
    total = args.context + args.length
    # The first episode of the task's part of the run's first test.
    env = build_env(config, test_seeds(seed, config.tasks.index(task) * config.test_episodes, 1)[0],
                    max_episode_length=min(config.max_episode_length, total * config.repeat_of(task)),
                    task=task, action_size=padded_action_size(config))
    env.frames = config.obs == "state" and env.renders  # From states, a frame beside each, for the video.
    labels = state_labels(env.state_sizes)
    if args.episode:
        episode = load_episode(args.episode)
    else:
        agent = Agent(model, config.planner, config.bit_depth, plan=config.plan(device))
        episode = play_episode(env, planner_policy(agent))
    env.close()
    frames_held = len(episode["reward"])
    if frames_held < args.context:
        sys.exit(f"error: the episode has {frames_held} frames, fewer than --context {args.context}")
    context = min(args.context, frames_held - 1)  # At least one frame predicted.
    if frames_held < total:  # It ended early (a robot fell): predict what it holds.
        logging.info("the episode ends after %d frames: predicting %d open loop instead of --length %d",
                     frames_held, frames_held - context, args.length)
        total = frames_held
    truth, prediction = open_loop_prediction(model, episode, context, total, config.bit_depth)
    out = Path(args.out or Path(args.run_dir) / f"video_prediction.{'gif' if args.gif else 'mp4'}")
    out = out.with_stem(out.stem + suffix)
    if config.obs == "pixels":
        frames = video_frames(truth, prediction, context)
    else:
        plot = Path(args.plot or Path(args.run_dir) / "state_prediction.png")
        image = state_plot(truth, prediction, context, labels)
        cv2.imwrite(str(plot), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        print(plot)
        frames = episode_frames(episode)
        if frames is None:
            logging.info("no video: %s renders no frames", task)
            return
        frames = observed_frames(frames[:total], context)
    (write_gif if args.gif else write_video)(out, frames)
    print(out)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
