"""Measure PlaNet's hot paths at the paper's sizes: `python bench.py [--device cuda] [--json FILE]`.

Every figure is warm (after warm-up runs) and the median of repeated runs, printed with the
number of runs and their spread (min-max). `--quick` shrinks the repeats and the training
iteration to a seconds-long smoke run; its figures are not the benchmark.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import resource
import statistics
import time

import numpy as np
import torch

from agent import Agent, cem_plan, planner_policy, play_episode, play_episodes
from model import WorldModel
from train import Config, test_seeds, train_model, update
from utils import BatchPrefetcher, ReplayBuffer, keep_freed_memory, resolve_device
from wrappers import make_env, make_parallel_envs

ENV_TASKS = ("cheetah-run", "cartpole-swingup")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1):
    """Run `fn` `warmup` + `repeats` times; -> the `repeats` wall-clock times in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return times


def summary(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def filled_buffer(config, action_size, episodes, rng):
    """A replay buffer of random cheetah-length episodes (random, not zeros: zeros can run faster)."""
    buffer = ReplayBuffer(config.chunk_length, seed=0)
    length = config.max_episode_length // config.action_repeat
    for _ in range(episodes):
        buffer.add({"obs": rng.integers(0, 256, (length + 1, 3, 64, 64), dtype=np.uint8),
                    "action": rng.uniform(-1, 1, (length + 1, action_size)).astype(np.float32),
                    "reward": rng.uniform(0, 1, length + 1).astype(np.float32)})
    return buffer


@contextlib.contextmanager
def stopwatch(times, name, device):
    """Append the wall-clock ms of the `with` body to `times[name]`."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    times.setdefault(name, []).append(1000 * (time.perf_counter() - start))


def bench_update(config, model, optimizer, buffer, device, repeats):
    """The update step as the training loop runs it (batches prefetched in the background), and
    its parts: waiting for the batch, forward (the loss), backward + clipping + Adam. Also the
    cost of making one batch (sampling + transfer + preprocessing) in the foreground."""
    generator = torch.Generator(device).manual_seed(0)
    batches = iter(BatchPrefetcher(buffer, config.batch_size, 2 * repeats + 2, device,
                                   config.bit_depth, generator))
    model.train()
    times = {"update": timed(lambda: update(model, optimizer, next(batches), config, 10_000), device, repeats)}
    parts = {}
    for _ in range(repeats + 1):
        with stopwatch(parts, "sample", device):
            data = next(batches)
        with stopwatch(parts, "forward", device):
            loss = model.loss(*data, config.free_nats, config.reward_scale)[0]
        with stopwatch(parts, "backward", device):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
    model.eval()
    times.update({name: values[1:] for name, values in parts.items()})  # The first warmed up.
    batcher = BatchPrefetcher(buffer, config.batch_size, 1, device, config.bit_depth, generator)
    times["batch"] = timed(batcher.batch, device, repeats)
    return {name: summary(values) for name, values in times.items()}


def bench_plan(config, model, device, repeats):
    belief, state = model.rssm.initial(1, device)
    return summary(timed(lambda: cem_plan(model.rssm, model.reward_model, belief, state,
                                          **config.planner), device, repeats))


def bench_env(task, steps):
    """Agent steps per second with random actions, one 64x64 render per decision."""
    env = make_env(task, seed=0)
    rng = np.random.default_rng(0)
    env.reset()
    start, done_steps = time.perf_counter(), 0
    while done_steps < steps:
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_size))
        done_steps += 1
        if terminated or truncated:
            env.reset()
    return done_steps / (time.perf_counter() - start)


def bench_iteration(config, model, optimizer, buffer, device, updates, episode_steps):
    """One training iteration as train.py runs it: `updates` model updates, then one episode
    collected with the planner and exploration noise. -> seconds."""
    env = make_env(config.task, seed=0, max_episode_length=episode_steps * config.action_repeat)
    agent = Agent(model, config.planner, config.bit_depth)
    generator = torch.Generator(device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    train_model(model, optimizer, buffer, dataclasses.replace(config, collect_interval=updates),
                device, generator, 10_000)
    play_episode(env, planner_policy(agent, config.action_noise))
    sync(device)
    return time.perf_counter() - start


def bench_test(config, model, device, episodes, decisions):
    """Agent steps per second of a noise-free test of `episodes` episodes of `decisions` steps,
    played in parallel (one batched CEM call per step) and one after another."""
    length = decisions * config.action_repeat
    rates = {}
    for parallel in (episodes, 1):
        with contextlib.closing(make_parallel_envs(config.task, parallel, config.action_repeat, length)) as envs:
            agent = Agent(model, config.planner, config.bit_depth, batch_size=parallel)
            play_episodes(envs, agent, test_seeds(0, 0, parallel))  # Warm-up.
            sync(device)
            start = time.perf_counter()
            for first in range(0, episodes, parallel):
                play_episodes(envs, agent, test_seeds(0, first, parallel))
            sync(device)
            rates["parallel" if parallel > 1 else "sequential"] = episodes * decisions / (time.perf_counter() - start)
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 7; quick 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    keep_freed_memory()
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    repeats = args.repeats or (2 if args.quick else 7)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = Config()  # The paper's sizes: cheetah-run, B=50, L=50, H=12, I=10, J=1000, K=100.
    config.action_repeat = 4
    action_size = make_env(config.task).action_size
    model = WorldModel(action_size).to(device).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_epsilon)
    buffer = filled_buffer(config, action_size, episodes=4 if args.quick else 20, rng=rng)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    logging.info("update step (B=%d, L=%d) ...", config.batch_size, config.chunk_length)
    updates = bench_update(config, model, optimizer, buffer, device, repeats)
    logging.info("CEM planning call (H=%d, I=%d, J=%d, K=%d) ...", config.horizon, config.iterations,
                 config.candidates, config.top_candidates)
    plan = bench_plan(config, model, device, repeats)
    logging.info("environments ...")
    env_rates = {task: [bench_env(task, 20 if args.quick else 250) for _ in range(max(1, repeats // 2))]
                 for task in ENV_TASKS}
    iteration_updates, episode_steps = (2, 5) if args.quick else (config.collect_interval, 250)
    logging.info("one training iteration (%d updates + an episode of %d steps) ...",
                 iteration_updates, episode_steps)
    iteration = bench_iteration(config, model, optimizer, buffer, device, iteration_updates, episode_steps)
    test_episodes, test_decisions = (2, 1) if args.quick else (config.test_episodes, 3)
    logging.info("a test of %d episodes of %d steps, in parallel and one after another ...",
                 test_episodes, test_decisions)
    test_rates = bench_test(config, model, device, test_episodes, test_decisions)

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "quick": args.quick,
        "update_ms": updates["update"]["median"], "sample_ms": updates["sample"]["median"],
        "batch_ms": updates["batch"]["median"],
        "forward_ms": updates["forward"]["median"], "backward_ms": updates["backward"]["median"],
        "plan_ms": plan["median"],
        "env_steps_per_s": {task: statistics.median(rates) for task, rates in env_rates.items()},
        "iteration_s": iteration,
        "iteration": {"updates": iteration_updates, "episode_steps": episode_steps},
        "test_steps_per_s": test_rates,
        "test": {"episodes": test_episodes, "steps_per_episode": test_decisions},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "spread": {**{name: value for name, value in updates.items()}, "plan": plan,
                   "env": {task: summary(rates) for task, rates in env_rates.items()}},
    }
    rows = [("update step", updates["update"], "ms"), ("  waiting for the prefetched batch", updates["sample"], "ms"),
            ("  forward (loss)", updates["forward"], "ms"), ("  backward + clip + Adam", updates["backward"], "ms"),
            ("one batch: sample + transfer + preprocess", updates["batch"], "ms"),
            ("CEM planning call", plan, "ms")]
    rows += [(f"env {task} (agent steps/s)", summary(rates), "") for task, rates in env_rates.items()]
    print(f"\n{results['device']}, torch {torch.__version__}{' (quick: not the benchmark)' if args.quick else ''}")
    print(f"{'figure':40} {'median':>10} {'min':>10} {'max':>10} {'runs':>5}")
    for name, stats, unit in rows:
        print(f"{name:40} {stats['median']:>10.1f} {stats['min']:>10.1f} {stats['max']:>10.1f} {stats['runs']:>5}  {unit}")
    print(f"{'training iteration':40} {iteration:>10.1f} {'':>10} {'':>10} {1:>5}  s "
          f"({iteration_updates} updates + {episode_steps}-step episode)")
    for mode, rate in test_rates.items():
        print(f"{'test, ' + mode + ' (agent steps/s)':40} {rate:>10.2f} {'':>10} {'':>10} {1:>5}  "
              f"({test_episodes} episodes of {test_decisions} steps)")
    print(f"{'peak host memory (RSS)':40} {results['peak_rss_mb']:>10.0f}{'':>27}  MB")
    if results["peak_gpu_mb"] is not None:
        print(f"{'peak GPU memory':40} {results['peak_gpu_mb']:>10.0f}{'':>27}  MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
