"""Measure PlaNet's hot paths at the paper's sizes: `python bench.py [--device cuda] [--json FILE]`.

On cheetah-run from pixels by default; `--task` and `--obs` measure another task, e.g.
`--task gym:Pendulum-v1 --obs state`.

Every figure is warm (after warm-up runs) and the median of repeated runs, printed with the
number of runs and their spread (min-max). `--quick` is a seconds-long smoke run: tiny models,
batches and planner (`QUICK`), few repeats and a short training iteration; its figures are not
the benchmark. The speed paths of
train.py (`--compile-update`, `--capture-planner`, `--replay-on-device`, `--tf32`, `--bf16`) are
flags here too. `python bench.py --check OUT_DIR --deadline SECONDS` checks and measures a GPU
box end to end instead (check.py).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch

from agent import Agent, planner_policy, play_episode, play_episodes
from config import SPEED_PATHS, Config, apply_preset
from runs import build_env, build_model, build_replay, test_seeds
from train import gradient_function, train_model, update
from utils import BatchPrefetcher, keep_freed_memory, resolve_device, set_matmul_precision
from wrappers import OBSERVATIONS, check_task, default_action_repeat, make_env, make_parallel_envs

ENV_TASKS = ("cheetah-run", "cartpole-swingup")
QUICK = {"batch_size": 4, "chunk_length": 8, "candidates": 16, "top_candidates": 4, "iterations": 2,
         "horizon": 3, "belief_size": 16, "state_size": 4, "hidden_size": 16, "reward_hidden_size": 16,
         "cnn_depth": 4, "embed_size": 16}
FIGURES = ("update", "plan", "env", "iteration", "test")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1, first=None):
    """Run `fn` `warmup` + `repeats` times; -> the `repeats` wall-clock times in ms. The first
    call's ms go to the list `first` if given: a compiled path's compile (and capture) time."""
    for i in range(warmup):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i == 0 and first is not None:
            first.append(1000 * (time.perf_counter() - start))
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


def random_episode(env, length, rng):
    """An episode of `length` steps of random numbers shaped as `env`'s (random, not zeros: zeros
    can run faster): frames or observation vectors, actions, rewards and proprioceptive states."""
    space = env.observation_space
    obs = (rng.integers(0, 256, (length, *space.shape), dtype=np.uint8) if space.dtype == np.uint8 else
           rng.normal(size=(length, *space.shape)).astype(np.float32))
    return {"obs": obs, "action": rng.uniform(-1, 1, (length, env.action_size)).astype(np.float32),
            "reward": rng.uniform(0, 1, length).astype(np.float32),
            **{f"state_{key}": rng.normal(size=(length, size)).astype(np.float32)
               for key, size in env.state_sizes.items()}}


def filled_buffer(config, env, episodes, rng, device):
    """A replay buffer of random episodes of the config's length."""
    buffer = build_replay(config, device, env.state_sizes)
    for _ in range(episodes):
        buffer.add(random_episode(env, config.max_episode_length // config.action_repeat + 1, rng))
    return buffer


@contextlib.contextmanager
def stopwatch(times, name, device):
    """Append the wall-clock ms of the `with` body to `times[name]`."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    times.setdefault(name, []).append(1000 * (time.perf_counter() - start))


def bench_update(config, model, optimizer, buffer, device, repeats, warmup):
    """The update step as the training loop runs it (batches prefetched in the background), and
    its parts: waiting for the batch, the gradients (loss and backward, one CUDA graph with
    --compile-update on CUDA), clipping + Adam. Also the cost of making one batch (sampling +
    transfer + preprocessing) in the foreground."""
    generator = torch.Generator(device).manual_seed(0)
    batches = iter(BatchPrefetcher(buffer, config.batch_size, 2 * repeats + 2 * warmup, device,
                                   config.bit_depth, generator))
    gradients = gradient_function(model, device, config.compile_update)
    model.train()
    first = []
    times = {"update": timed(lambda: update(model, optimizer, next(batches), config, 10_000, gradients),
                             device, repeats, warmup, first), "update_first": first}
    parts = {}
    for _ in range(repeats + warmup):
        with stopwatch(parts, "sample", device):
            data = next(batches)
        with stopwatch(parts, "gradients", device):
            gradients(*data, config.free_nats, config.reward_scale, config.overshooting_distance,
                      config.overshooting_kl_beta, config.overshooting_reward_scale, config.global_kl_beta, {})
        with stopwatch(parts, "step", device):
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
    model.eval()
    times.update({name: values[warmup:] for name, values in parts.items()})  # The first warmed up.
    batcher = BatchPrefetcher(buffer, config.batch_size, 1, device, config.bit_depth, generator)
    times["batch"] = timed(batcher.batch, device, repeats)
    return {name: summary(values) for name, values in times.items()}


def bench_plan(config, model, device, repeats, warmup):
    belief, state = model.rssm.initial(1, device)
    plan = config.plan(device)
    first = []
    times = timed(lambda: plan(model.rssm, model.reward_model, belief, state, **config.planner),
                  device, repeats, warmup, first)
    return summary(times), first[0]


def project_run(config, model, env, episodes_left, device):
    """How long the rest of a run takes at `config`, from one update and one planning call timed
    now (each after a warm-up call) on a copy of the model, on random observations, with torch's
    random state restored after: the run itself is untouched. A trained episode is C updates and a CEM
    call per decision; each test, one batched call per decision for its parallel episodes, counted
    as that many single calls. -> (seconds per trained episode, seconds in all, the parts)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_epsilon)
    decisions = -(-config.max_episode_length // env.action_repeat)
    buffer = build_replay(config, device, env.state_sizes)
    buffer.add(random_episode(env, config.chunk_length + 1, np.random.default_rng(0)))  # Either alignment.
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # The batch's noise, the updates' and CEM's draws.
        batch = BatchPrefetcher(buffer, config.batch_size, 1, device, config.bit_depth).batch()
        model.train()
        update_seconds = timed(lambda: update(model, optimizer, batch, config, config.warmup_updates),
                               device, repeats=1)[0] / 1000
        model.eval()
        plan_seconds = bench_plan(config, model, device, repeats=1, warmup=1)[0]["median"] / 1000
    per_episode = config.collect_interval * update_seconds + decisions * plan_seconds
    tests = episodes_left // config.test_interval + 1
    total = episodes_left * per_episode + tests * config.test_episodes * decisions * plan_seconds
    return per_episode, total, {"update": update_seconds, "plan": plan_seconds, "decisions": decisions}


def bench_env(task, steps, obs="pixels"):
    """Agent steps per second with random actions, from pixels one 64x64 render per decision."""
    env = make_env(task, seed=0, obs=obs)
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
    env = build_env(config, max_episode_length=episode_steps * config.action_repeat)
    agent = Agent(model, config.planner, config.bit_depth, plan=config.plan(device))
    generator = torch.Generator(device).manual_seed(0)
    gradients = gradient_function(model, device, config.compile_update)
    warm = dataclasses.replace(config, collect_interval=min(updates, 3))  # Compiled paths compile.
    train_model(model, optimizer, buffer, warm, device, generator, 10_000, gradients)
    play_episode(build_env(config, seed=1, max_episode_length=3 * config.action_repeat),
                 planner_policy(agent, config.action_noise))
    sync(device)
    start = time.perf_counter()
    train_model(model, optimizer, buffer, dataclasses.replace(config, collect_interval=updates),
                device, generator, 10_000, gradients)
    play_episode(env, planner_policy(agent, config.action_noise))
    sync(device)
    return time.perf_counter() - start


def bench_test(config, model, device, episodes, decisions):
    """Agent steps per second of a noise-free test of `episodes` episodes of `decisions` steps,
    played in parallel (one batched CEM call per step) and one after another."""
    length = decisions * config.action_repeat
    rates = {}
    for parallel in (episodes, 1):
        with contextlib.closing(make_parallel_envs(config.task, parallel, config.action_repeat, length,
                                                   config.obs)) as envs:
            agent = Agent(model, config.planner, config.bit_depth, batch_size=parallel,
                          plan=config.plan(device))
            play_episodes(envs, agent, test_seeds(0, 0, parallel))  # Warm-up.
            sync(device)
            start = time.perf_counter()
            for first in range(0, episodes, parallel):
                play_episodes(envs, agent, test_seeds(0, first, parallel))
            sync(device)
            rates["parallel" if parallel > 1 else "sequential"] = episodes * decisions / (time.perf_counter() - start)
    return rates


def speed_flag(name):
    return "--" + name.replace("_", "-")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--task", default=Config.task,
                        help="the task whose env, action size and episode length are measured, as train.py's")
    parser.add_argument("--obs", default=Config.obs, choices=OBSERVATIONS, help="what the agent sees, as train.py's")
    parser.add_argument("--preset", default="",
                        help="measure at a preset's settings instead of the paper's, as train.py's, e.g. small")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run at tiny sizes")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 7; quick 2)")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES),
                        help="measure only these")
    parser.add_argument("--compile-planner", action="store_true",
                        help="plan with the compiled rollout, as train.py --compile-planner")
    for name in SPEED_PATHS:
        parser.add_argument(speed_flag(name), action="store_true", help=f"as train.py {speed_flag(name)}")
    parser.add_argument("--check", metavar="OUT_DIR", default=None,
                        help="check and measure this machine end to end instead (check.py): set-up, "
                             "the device tests, the figures of each speed path, a training run "
                             "killed and resumed, test.py and video_prediction.py; results in OUT_DIR")
    parser.add_argument("--deadline", type=float, default=420,
                        help="with --check: seconds for all of it; it ends by then, whatever hangs")
    parser.add_argument("--work-dir", default=None,
                        help="with --check: where the training run goes (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.check:
        import check  # Which imports this module for its figures.
        return check.main(args.check, args.deadline, args.device, args.quick, args.work_dir)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    keep_freed_memory()
    try:
        device = resolve_device(args.device)
        check_task(args.task, args.obs)
        settings = apply_preset({"task": args.task, "obs": args.obs, "preset": args.preset,
                                 "action_repeat": default_action_repeat(args.task)})
    except ValueError as error:
        parser.error(str(error))
    repeats = args.repeats or (2 if args.quick else 7)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    paths = {name: getattr(args, name) for name in SPEED_PATHS}
    # The paper's sizes unless a preset is given: cheetah-run, B=50, L=50, H=12, I=10, J=1000, K=100.
    config = Config(**{**settings, "compile_planner": args.compile_planner, **paths, **(QUICK if args.quick else {})})
    set_matmul_precision(device, config.tf32)
    # Compiled paths compile at the first call and, on CUDA, record their graphs at the next.
    warmup = 3 if config.compile_update or config.capture_planner else 1
    env = build_env(config)
    model = build_model(config, env).to(device).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_epsilon)
    buffer = filled_buffer(config, env, 4 if args.quick else 20, rng, device)
    env.close()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
               "task": config.task, "obs": config.obs, "preset": config.preset,
               "compile_planner": args.compile_planner, "speed_paths": [name for name, on in paths.items() if on]}
    spread, rows = {}, []  # rows: (name, summary, unit)

    if "update" in args.figures:
        logging.info("update step (B=%d, L=%d) ...", config.batch_size, config.chunk_length)
        updates = bench_update(config, model, optimizer, buffer, device, repeats, warmup)
        for key, name in (("update", "update step"), ("sample", "  waiting for the prefetched batch"),
                          ("gradients", "  loss + backward"), ("step", "  clip + Adam"),
                          ("batch", "one batch: sample + transfer + preprocess")):
            results[f"{key}_ms"] = updates[key]["median"]
            rows.append((name, updates[key], "ms"))
        results["update_first_s"] = updates.pop("update_first")["median"] / 1000
        rows.append(("first update step (compiles, captures)", summary([results["update_first_s"]]), "s"))
        spread.update(updates)
    if "plan" in args.figures:
        logging.info("CEM planning call (H=%d, I=%d, J=%d, K=%d) ...", config.horizon, config.iterations,
                     config.candidates, config.top_candidates)
        spread["plan"], first = bench_plan(config, model, device, repeats, warmup)
        results["plan_ms"], results["plan_first_s"] = spread["plan"]["median"], first / 1000
        rows.append(("CEM planning call", spread["plan"], "ms"))
        rows.append(("first CEM call (compiles, captures)", summary([results["plan_first_s"]]), "s"))
    if "env" in args.figures:
        logging.info("environments ...")
        tasks = ENV_TASKS if (config.task, config.obs) == (Config.task, Config.obs) else (config.task,)
        spread["env"] = {task: summary([bench_env(task, 20 if args.quick else 250, config.obs)
                                        for _ in range(max(1, repeats // 2))]) for task in tasks}
        results["env_steps_per_s"] = {task: stats["median"] for task, stats in spread["env"].items()}
        rows += [(f"env {task}", stats, "agent steps/s") for task, stats in spread["env"].items()]
    if "iteration" in args.figures:
        updates, steps = (2, 5) if args.quick else (config.collect_interval, 250)
        logging.info("one training iteration (%d updates + an episode of %d steps) ...", updates, steps)
        results["iteration_s"] = bench_iteration(config, model, optimizer, buffer, device, updates, steps)
        results["iteration"] = {"updates": updates, "episode_steps": steps}
        rows.append(("training iteration", summary([results["iteration_s"]]),
                     f"s ({updates} updates + a {steps}-step episode)"))
    if "test" in args.figures:
        episodes, steps = (2, 1) if args.quick else (config.test_episodes, 3)
        logging.info("a test of %d episodes of %d steps, in parallel and one after another ...", episodes, steps)
        results["test_steps_per_s"] = bench_test(config, model, device, episodes, steps)
        results["test"] = {"episodes": episodes, "steps_per_episode": steps}
        rows += [(f"test, {mode}", summary([rate]), f"agent steps/s ({episodes} episodes of {steps} steps)")
                 for mode, rate in results["test_steps_per_s"].items()]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak host memory (RSS)", summary([results["peak_rss_mb"]]), "MB"))
    if device.type == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(("peak GPU memory", summary([results["peak_gpu_mb"]]), "MB"))
    results["spread"] = spread

    flags = [speed_flag(name) for name in results["speed_paths"]] + ["--compile-planner"] * args.compile_planner
    print(f"\n{results['device']}, torch {torch.__version__}, {config.task} from {config.obs}"
          f"{', preset ' + config.preset if config.preset else ''}"
          f"{', ' + ' '.join(flags) if flags else ', eager'}"
          f"{' (quick: not the benchmark)' if args.quick else ''}")
    print(f"{'figure':42} {'median':>10} {'min':>10} {'max':>10} {'runs':>5}")
    for name, stats, unit in rows:
        print(f"{name:42} {stats['median']:>10.1f} {stats['min']:>10.1f} {stats['max']:>10.1f} {stats['runs']:>5}  {unit}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
