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
from torch.utils._python_dispatch import TorchDispatchMode

from agent import Agent, planner_policy, play_episode, play_episodes
from config import SPEED_PATHS, Config, apply_preset
from model import gpu_order
from runs import build_env, build_model, build_replay, test_seeds
from train import build_optimizer, clip_gradients, gradient_function, loss_arguments, train_model, update
from utils import BatchPrefetcher, keep_freed_memory, resolve_device, set_matmul_precision, write_json
from wrappers import OBSERVATIONS, check_task, default_action_repeat, make_env, make_parallel_envs

ENV_TASKS = ("cheetah-run", "cartpole-swingup")
QUICK = {"batch_size": 4, "chunk_length": 8, "candidates": 16, "top_candidates": 4, "iterations": 2,
         "horizon": 3, "belief_size": 16, "state_size": 4, "hidden_size": 16, "reward_hidden_size": 16,
         "cnn_depth": 4, "embed_size": 16}
FIGURES = ("launches", "update", "plan", "env", "iteration", "test")


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
    gradients = gradient_function(model, device, config.compile_update, config.capture_update)
    model.train()
    first = []
    times = {"update": timed(lambda: update(model, optimizer, next(batches), config, 10_000, gradients),
                             device, repeats, warmup, first), "update_first": first}
    parts = {}
    for _ in range(repeats + warmup):
        with stopwatch(parts, "sample", device):
            data = next(batches)
        with stopwatch(parts, "gradients", device):
            gradients(*loss_arguments(model, data, config))
        with stopwatch(parts, "step", device):
            clip_gradients(model, config)
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
    times = timed(lambda: plan(model.rssm, model.reward_model, belief, state, **config.planner,
                               continue_model=model.continue_model),
                  device, repeats, warmup, first)
    return summary(times), first[0]


def project_run(config, model, env, episodes_left, device):
    """How long the rest of a run takes at `config`, from one update and one planning call timed
    now (each after a warm-up call) on a copy of the model, on random observations, with torch's
    random state restored after: the run itself is untouched. A trained episode is C updates and a CEM
    call per decision; each test, one batched call per decision for its parallel episodes, counted
    as that many single calls. -> (seconds per trained episode, seconds in all, the parts)."""
    model = copy.deepcopy(model)
    optimizer = build_optimizer(model, config)
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
    gradients = gradient_function(model, device, config.compile_update, config.capture_update)
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


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched that launch a kernel: the number that eager PyTorch
    launches on a CPU, and a proxy of it on CUDA, where some ops are fused kernels (nn.GRUCell)
    and a few launch two. Left out are the ops that only alias their input (views, and those
    that return views undeclared: `unsafe_split`, inside nn.GRUCell on a CPU) and the
    profiler's markers (`optimizer.step` sets two)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.namespace != "profiler" and not aliases_only(func, args, out):
            self.ops += 1
        return out


def aliases_only(func, args, out):
    """Whether `func`, writing to none of its arguments, returned only views of its inputs' memory."""
    if func._schema.is_mutable:
        return False
    inputs = {arg.untyped_storage().data_ptr() for arg in args if isinstance(arg, torch.Tensor)}
    outputs = out if isinstance(out, (list, tuple)) else [out]
    return bool(outputs) and all(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in inputs
                                 and x.numel() > 0 for x in outputs)


def count_launches(fn, device):
    """-> {"ops": the non-view ATen ops that one `fn()` dispatches, and on CUDA, from the
    profiler's trace of another, "kernels": the kernels, copies and fills that ran on the GPU
    and "gpu_ms": their summed durations, the time the GPU was busy}. Eager, ops and kernels
    are near each other; replaying a CUDA graph dispatches a handful of ops and runs the
    graph's thousands of kernels."""
    with OpCounter() as counter:
        fn()
    counts = {"ops": counter.ops}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            fn()
            sync(device)
        kernels = [event for event in trace.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        counts["kernels"] = len(kernels)
        counts["gpu_ms"] = sum(event.time_range.elapsed_us() for event in kernels) / 1000
    return counts


def bench_launches(config, model, optimizer, buffer, device):
    """The launches of one update step (batch ready to Adam step done) and one CEM call, each
    as `config` runs it (eager, or a warm captured graph)."""
    batch = BatchPrefetcher(buffer, config.batch_size, 1, device, config.bit_depth).batch()
    gradients = gradient_function(model, device, config.compile_update, config.capture_update)
    step = lambda: update(model, optimizer, batch, config, 10_000, gradients)
    belief, state = model.rssm.initial(1, device)
    plan = config.plan(device)
    call = lambda: plan(model.rssm, model.reward_model, belief, state, **config.planner,
                        continue_model=model.continue_model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        for _ in range(2):  # A captured path captures here.
            step()
        counts = {"update": count_launches(step, device)}
        model.eval()
        for _ in range(2):
            call()
        counts["plan"] = count_launches(call, device)
        if device.type == "cpu" and not (config.capture_planner or config.compile_update):
            with gpu_order():  # The same code in a GPU's order: a CPU's count of a GPU's launches.
                model.train()
                counts["update_gpu_order"] = count_launches(step, device)
                model.eval()
                counts["plan_gpu_order"] = count_launches(call, device)
    return counts


def speed_flag(name):
    return "--" + name.replace("_", "-")


def parse_variant(text):
    """`eager` or speed paths joined by commas (`capture_planner,tf32`) -> their settings, every
    other path off. Raises ValueError for an unknown path."""
    paths = [] if text == "eager" else text.replace("-", "_").split(",")
    unknown = [path for path in paths if path not in SPEED_PATHS]
    if unknown:
        raise ValueError(f"unknown speed path {', '.join(unknown)} in --variants {text}; "
                         f"known: eager, {', '.join(SPEED_PATHS)}")
    return {name: name in paths for name in SPEED_PATHS}


def measure(config, device, figures, repeats, quick, on_figure):
    """Every figure of `figures` at `config`, calling `on_figure(results)` after each, so that a
    run stopped half way keeps what it measured. -> (results, spread, printed rows)."""
    set_matmul_precision(device, config.tf32)
    # Compiled paths compile at the first call and, on CUDA, record their graphs at the next.
    warmup = 3 if config.compile_update or config.capture_planner or config.capture_update else 1
    rng = np.random.default_rng(0)
    env = build_env(config)
    model = build_model(config, env).to(device).eval()
    optimizer = build_optimizer(model, config)
    buffer = filled_buffer(config, env, 4 if quick else 20, rng, device)
    env.close()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "cuda": torch.version.cuda, "quick": quick,
               "task": config.task, "obs": config.obs, "preset": config.preset,
               "compile_planner": config.compile_planner, "speed_paths": config.speed_paths()}
    spread, rows = {}, []  # rows: (name, summary, unit)

    if "launches" in figures:
        logging.info("kernel launches of an update step and a CEM call ...")
        results["launches"] = bench_launches(config, model, optimizer, buffer, device)
        for name, counts in results["launches"].items():
            for kind, count in counts.items():
                rows.append((f"launches, {name}: {kind}", summary([count]), "per call"))
        on_figure(results)
    if "update" in figures:
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
        on_figure(results)
    if "plan" in figures:
        logging.info("CEM planning call (H=%d, I=%d, J=%d, K=%d) ...", config.horizon, config.iterations,
                     config.candidates, config.top_candidates)
        spread["plan"], first = bench_plan(config, model, device, repeats, warmup)
        results["plan_ms"], results["plan_first_s"] = spread["plan"]["median"], first / 1000
        rows.append(("CEM planning call", spread["plan"], "ms"))
        rows.append(("first CEM call (compiles, captures)", summary([results["plan_first_s"]]), "s"))
        on_figure(results)
    if "env" in figures:
        logging.info("environments ...")
        tasks = ENV_TASKS if (config.task, config.obs) == (Config.task, Config.obs) else (config.task,)
        spread["env"] = {task: summary([bench_env(task, 20 if quick else 250, config.obs)
                                        for _ in range(max(1, repeats // 2))]) for task in tasks}
        results["env_steps_per_s"] = {task: stats["median"] for task, stats in spread["env"].items()}
        rows += [(f"env {task}", stats, "agent steps/s") for task, stats in spread["env"].items()]
        on_figure(results)
    if "iteration" in figures:
        updates, steps = (2, 5) if quick else (config.collect_interval, 250)
        logging.info("one training iteration (%d updates + an episode of %d steps) ...", updates, steps)
        results["iteration_s"] = bench_iteration(config, model, optimizer, buffer, device, updates, steps)
        results["iteration"] = {"updates": updates, "episode_steps": steps}
        rows.append(("training iteration", summary([results["iteration_s"]]),
                     f"s ({updates} updates + a {steps}-step episode)"))
        on_figure(results)
    if "test" in figures:
        episodes, steps = (2, 1) if quick else (config.test_episodes, 3)
        logging.info("a test of %d episodes of %d steps, in parallel and one after another ...", episodes, steps)
        results["test_steps_per_s"] = bench_test(config, model, device, episodes, steps)
        results["test"] = {"episodes": episodes, "steps_per_episode": steps}
        rows += [(f"test, {mode}", summary([rate]), f"agent steps/s ({episodes} episodes of {steps} steps)")
                 for mode, rate in results["test_steps_per_s"].items()]
        on_figure(results)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak host memory (RSS)", summary([results["peak_rss_mb"]]), "MB"))
    if device.type == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(("peak GPU memory", summary([results["peak_gpu_mb"]]), "MB"))
    on_figure(results)
    return results, spread, rows


def print_table(results, rows, config, quick):
    flags = [speed_flag(name) for name in results["speed_paths"]] + ["--compile-planner"] * config.compile_planner
    print(f"\n{results['device']}, torch {torch.__version__}, {config.task} from {config.obs}"
          f"{', preset ' + config.preset if config.preset else ''}"
          f"{', ' + ' '.join(flags) if flags else ', eager'}"
          f"{' (quick: not the benchmark)' if quick else ''}")
    print(f"{'figure':42} {'median':>10} {'min':>10} {'max':>10} {'runs':>5}")
    for name, stats, unit in rows:
        print(f"{name:42} {stats['median']:>10.1f} {stats['min']:>10.1f} {stats['max']:>10.1f} {stats['runs']:>5}  {unit}")


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
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=[f for f in FIGURES if f != "launches"],
                        help="measure only these (launches: the kernels of an update step and a CEM call)")
    parser.add_argument("--compile-planner", action="store_true",
                        help="plan with the compiled rollout, as train.py --compile-planner")
    for name in SPEED_PATHS:
        parser.add_argument(speed_flag(name), action=argparse.BooleanOptionalAction, default=None,
                            help=f"as train.py {speed_flag(name)} (default: the device's, as train.py's)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="PATHS",
                        help="measure each of these in turn in this one process, instead of the speed "
                             "path flags: eager, or speed paths joined by commas (capture_planner,tf32); "
                             "env for the first only, iteration and test for the last only; "
                             "--json then holds {variant: figures}, written after every figure")
    parser.add_argument("--check", metavar="OUT_DIR", default=None,
                        help="check and measure this machine end to end instead (check.py): set-up, "
                             "the device tests, the figures of each speed path, a training run "
                             "killed and resumed, test.py and video_prediction.py; results in OUT_DIR")
    parser.add_argument("--deadline", type=float, default=420,
                        help="with --check: seconds for all of it; it ends by then, whatever hangs")
    parser.add_argument("--work-dir", default=None,
                        help="with --check: where the training run goes (default: a new temporary folder)")
    parser.add_argument("--steps", nargs="+", default=None,
                        help="with --check: only these of its steps (setup correctness figures training evaluation)")
    args = parser.parse_args(argv)
    if args.check:
        import check  # Which imports this module for its figures.
        return check.main(args.check, args.deadline, args.device, args.quick, args.work_dir, args.steps)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms  %(message)s", force=True)
    keep_freed_memory()
    try:
        device = resolve_device(args.device)
        check_task(args.task, args.obs)
        settings = apply_preset({"task": args.task, "obs": args.obs, "preset": args.preset,
                                 "action_repeat": default_action_repeat(args.task)})
        flags = {name: getattr(args, name) for name in SPEED_PATHS if getattr(args, name) is not None}
        variants = {text: parse_variant(text) for text in args.variants or []} or {"": flags}
    except ValueError as error:
        parser.error(str(error))
    repeats = args.repeats or (2 if args.quick else 7)
    measured = {}

    def write(name, results):
        measured[name] = {**results}
        if args.json:
            write_json(args.json, measured if args.variants else measured[""])

    for i, (name, paths) in enumerate(variants.items()):
        # With variants, the envs (which no speed path changes) run for the first only, and the
        # slowest figures (iteration, test) for the last only, the candidate for training.
        figures = [f for f in args.figures if not args.variants or
                   (f != "env" or i == 0) and (f not in ("iteration", "test") or i == len(variants) - 1)]
        torch.manual_seed(0)
        # The paper's sizes unless a preset is given: cheetah-run, B=50, L=50, H=12, I=10, J=1000, K=100.
        config = Config(**{**settings, "compile_planner": args.compile_planner, **paths,
                           **(QUICK if args.quick else {})}).for_device(device)
        if name:
            logging.info("variant %s", name)
        results, spread, rows = measure(config, device, figures, repeats, args.quick,
                                        lambda results: write(name, results))
        write(name, {**results, "spread": spread})
        print_table(results, rows, config, args.quick)


if __name__ == "__main__":
    sys.exit(main())
