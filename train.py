"""Train PlaNet from pixels: `python train.py --task cheetah-run`, `python train.py --resume RUN_DIR`.

Algorithm 1 of the paper: a few seed episodes with random actions, then repeat: C model updates on
chunks sampled from the replay buffer, one episode collected with the CEM planner plus exploration
noise, and every few episodes a noise-free test. Everything goes into `<log-dir>/<task>/<time>/`,
and a checkpoint after every episode lets a killed run continue where it was.
"""
import argparse
import dataclasses
import io
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agent import (STATE_PREFIX, Agent, captured_cem_plan, cem_plan, compiled_rollout_returns, planner_policy,
                   play_episode, play_episodes, random_policy, rollout_returns)
from model import GRU_CELLS, INITS, MODELS, STATE_HEADS, WorldModel
from utils import (REPLAY_KEYS, BatchPrefetcher, DeviceReplayBuffer, ReplayBuffer, append_jsonl,
                   atomic_write, derive_seed, episode_index, episode_paths, global_rng_state,
                   keep_freed_memory, load_episode, open_loop_errors, open_loop_frames,
                   outgoing_reward_chunks, pack_random_state, read_jsonl, resolve_device, save_episode,
                   set_global_rng_state, set_matmul_precision, set_seed_everywhere, unpack_random_state,
                   write_json, write_jsonl)
from wrappers import default_action_repeat, make_env, make_parallel_envs, parse_task

CHECKPOINT = "checkpoint.pt"
TEST_SEED_OFFSET = 10_000  # Tags the stream of test-episode seeds, apart from training's.
BATCH_NOISE_TAG = 20_000  # Tags the seed of the batches' dequantisation noise.
CUDA_RESEED_TAG = 30_000  # Tags the seed of the CUDA generators when a CPU checkpoint resumes on CUDA.
POSITIVE = ("episodes", "seed_episodes", "collect_interval", "batch_size", "chunk_length",
            "max_episode_length", "buffer_capacity", "horizon", "iterations", "candidates",
            "top_candidates", "test_interval", "test_episodes", "checkpoint_interval", "belief_size",
            "state_size", "hidden_size", "reward_hidden_size", "reward_layers", "cnn_depth", "bit_depth")
# Every other setting stays the run's own on --resume.
SPEED_PATHS = ("capture_planner", "compile_update", "replay_on_device", "tf32", "bf16")
RESUME_MAY_CHANGE = ("episodes", "device", "nan_policy", "compile_planner") + SPEED_PATHS


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Defaults are the official code's (paper Appendix A)."""

    task: str = option("cheetah-run", "dm_control task as domain-task, e.g. cartpole-swingup, cup-catch; "
                       "or gym:ID, a Gymnasium env from pixels, e.g. gym:Pendulum-v1")
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
    collect: str = option("planner", "how episodes after the seed episodes are collected: planner "
                          "(CEM plus exploration noise) or random (uniform actions: the 'random "
                          "collection' agent of Sec. 5, Figure 5; tests still plan)")
    buffer_capacity: int = option(1_000_000, "agent steps kept in memory for replay")
    # Planner (CEM).
    horizon: int = option(12, "planning horizon (H)")
    iterations: int = option(10, "CEM iterations (I)")
    candidates: int = option(1000, "action sequences per iteration (J)")
    top_candidates: int = option(100, "best sequences the belief is refit to (K)")
    planner_discount: float = option(1.0, "discount of the predicted rewards in a candidate's return: "
                                     "1 (HEAD c04226b) or 0.99 (camera-ready 0c6f7d3)")
    compile_planner: bool = option(False, "torch.compile the planner's rollout: fused elementwise "
                                   "ops, the same function up to float rounding, compiled at the first step")
    # Speed paths for a GPU, each the same function up to float rounding (tests/test_device.py
    # checks it on the device: `python bench.py --check` runs them there); off until shown there.
    capture_planner: bool = option(False, "torch.compile the whole CEM call, on CUDA as one CUDA "
                                   "graph (mode reduce-overhead); supersedes --compile-planner")
    compile_update: bool = option(False, "torch.compile the loss, and so its backward, on CUDA as "
                                  "CUDA graphs of the whole L-step unroll (mode reduce-overhead)")
    replay_on_device: bool = option(False, "keep the replay buffer on the device (uint8 frames) and "
                                    "sample batches by indexing there, with no host copy")
    tf32: bool = option(False, "CUDA only: float32 matmuls and convolutions on TF32 tensor cores "
                        "(off: full float32, convolutions included)")
    bf16: bool = option(False, "run the encoder and decoder under bf16 autocast (outputs, RSSM and "
                        "losses stay float32)")
    # Evaluation and saving.
    test_interval: int = option(10, "episodes between noise-free tests")
    test_episodes: int = option(10, "episodes per test")
    checkpoint_interval: int = option(1, "episodes between checkpoints (one is also written at the end)")
    # Model.
    model: str = option("rssm", "transition model: rssm (PlaNet), ssm (stochastic only) or gru "
                        "(deterministic only), the designs of Sec. 5, Figure 4")
    gru_cell: str = option("torch", "the RSSM's GRU: torch (nn.GRUCell) or block (the official "
                           "TensorFlow GRUBlockCell: reset gate before the recurrent product)")
    init: str = option("torch", "initialisation: torch (PyTorch's defaults) or glorot (the official "
                       "TensorFlow default: Glorot-uniform kernels, zero biases)")
    belief_size: int = option(200, "GRU belief size (deterministic state h; unused by the ssm)")
    state_size: int = option(30, "stochastic state size (s)")
    hidden_size: int = option(200, "hidden layer size of the transition model")
    reward_hidden_size: int = option(300, "hidden layer size of the reward model (and state heads)")
    reward_layers: int = option(3, "hidden layers of the reward model (and state heads): 3 (HEAD "
                                "c04226b) or 2 (camera-ready 0c6f7d3, with size 100)")
    state_heads: str = option("none", "heads that predict the proprioceptive state (position, "
                              "velocity, ...) from the features: none; diagnostic (HEAD's "
                              "state_diagnostics: gradient stopped at the features, errors logged "
                              "at each test); or loss (camera-ready 0c6f7d3: trained into the model)")
    cnn_depth: int = option(32, "channels of the first conv layer of encoder and decoder")
    # Loss and optimiser.
    bit_depth: int = option(5, "bits per colour channel of the observations")
    free_nats: float = option(3.0, "KL below this many nats is not penalised")
    reward_scale: float = option(10.0, "weight of the reward log-likelihood")
    reward_alignment: str = option("incoming", "the reward that the features of step t predict: "
                                   "incoming (HEAD c04226b: the reward of the transition into "
                                   "obs[t]) or outgoing (camera-ready 0c6f7d3: the reward after the "
                                   "action taken at obs[t], each chunk's first action zeroed)")
    overshooting_distance: int = option(0, "latent overshooting up to distance D: the KLs of d = 2..D "
                                           "(0: off, as the paper's agent)")
    overshooting_kl_beta: float = option(1.0, "weight of the latent overshooting KL")
    overshooting_reward_scale: float = option(0.0, "weight of reward overshooting, the reward NLL "
                                              "on the same open-loop states, as Kaixhin/PlaNet "
                                              "(0: off; the official releases' reward overshooting "
                                              "is another loss, see docs/faithfulness.md)")
    global_kl_beta: float = option(0.0, "weight of the global KL prior, KL(posterior || N(0, I)) "
                                   "(0: off; the first official release used 0.1)")
    learning_rate: float = option(1e-3, "Adam learning rate")
    warmup_updates: int = option(200, "updates over which the learning rate ramps up linearly from 0 "
                                 "(official: 10,000 sequences = 200 updates of 50); 0: off")
    adam_epsilon: float = option(1e-4, "Adam epsilon")
    grad_clip_norm: float = option(1000.0, "global gradient norm clip")
    nan_policy: str = option("stop", "on a non-finite loss or gradient: stop (keeping the last "
                             "checkpoint) or skip that update (which waits for the GPU at every "
                             "update, to look at the loss before Adam steps)")
    preset: str = option("", "a named set of defaults from PRESETS, e.g. small (flags given with it win)")

    @property
    def planner(self):
        """The keyword arguments of `cem_plan`."""
        compiled = self.compile_planner and not self.capture_planner  # Else compiled whole, or not.
        return {"horizon": self.horizon, "iterations": self.iterations,
                "candidates": self.candidates, "top_candidates": self.top_candidates,
                "discount": self.planner_discount,
                "rollout": compiled_rollout_returns() if compiled else rollout_returns}

    def plan(self, device):
        """The CEM function that agents on `device` call with `planner`."""
        return captured_cem_plan(torch.device(device).type) if self.capture_planner else cem_plan


# Smaller settings for a machine without a GPU. Each keeps the paper's method (the same model
# family, loss and CEM planner) and shrinks only what costs time. `small` trains cartpole-swingup
# for 80 episodes: about 2 h 45 min on 2 CPU cores, from the per-episode times below. README
# "Results" shows what it reaches and "Learning on a CPU" how its values were chosen.
PRESETS = {
    "small": {
        "batch_size": 16,  # B x L = 800 frames per update instead of 2500.
        "collect_interval": 50,  # C: updates per collected episode.
        "candidates": 200, "top_candidates": 20, "iterations": 5,  # J, K, I; the horizon stays 12.
        "test_interval": 5, "test_episodes": 5,
        "cnn_depth": 16,  # Encoder/decoder channels 16..128: an update is 2.6x faster on a CPU.
        "episodes": 80,  # Measured alone on 2 cores: 106 s per episode, 124 s per test.
    },
    # The official code at commit 0c6f7d3 (May 2019, "Update hyper parameters to camera ready
    # version"), where it differs from HEAD c04226b, which the defaults follow. docs/faithfulness.md
    # gives the source lines of each item.
    "camera-ready": {
        "state_heads": "loss",  # Position, velocity (touch, ...) heads trained into the model.
        "reward_layers": 2, "reward_hidden_size": 100,  # `feed_forward` of `networks/basic.py`.
        "planner_discount": 0.99,
        "reward_alignment": "outgoing",
        # By dm_control task; the others keep the paper's. 166 decisions of 6: 996 physics steps.
        "action_repeat": {("ball_in_cup", "catch"): 6}, "max_episode_length": {("ball_in_cup", "catch"): 996},
        "gru_cell": "block", "init": "glorot",  # TensorFlow's, as in both official versions.
    },
}


def apply_preset(given):
    """The flags given, on top of the defaults of `--preset NAME[,NAME...]` (applied in turn), which
    it logs. A preset's value may be a dict by dm_control `(domain, task)`: the task's entry, or
    nothing for another task. Raises ValueError for an unknown preset or task."""
    names = [name for name in given.get("preset", "").split(",") if name]
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise ValueError(f"unknown --preset {', '.join(unknown)}; known presets: {', '.join(PRESETS)}")
    task = parse_task(given.get("task", Config.task))
    settings = {}
    for name in names:
        chosen = {key: value.get(task) if isinstance(value, dict) else value
                  for key, value in PRESETS[name].items()}
        chosen = {key: value for key, value in chosen.items() if value is not None}
        overridden = sorted(set(chosen) & set(given))
        logging.info("preset %s: %s%s", name, ", ".join(f"{key}={value}" for key, value in chosen.items()),
                     f" (overridden by flags: {', '.join(overridden)})" if overridden else "")
        settings.update(chosen)
    return {**settings, **given}


def parse_args(argv=None):
    """-> (config, run directory, whether to resume it). The run directory is None when a new
    one should be made under `<log-dir>/<task>/`. Exits with a message on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue this run with its own config; --episodes may be raised")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="start a new run in DIR (which must not hold a run yet) instead of "
                             "<log-dir>/<task>/<time>; for sweeps that need known paths")
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
        parser.add_argument("--" + f.name.replace("_", "-"), **kind,
                            help=f"{f.metadata['help']} (default: {f.default})")
    given = vars(parser.parse_args(argv))  # Only the flags on the command line.
    resume, run_dir = given.pop("resume", None), given.pop("run_dir", None)
    if resume and run_dir:
        parser.error("give either --resume or --run-dir")
    if run_dir and (Path(run_dir) / "config.json").exists():
        parser.error(f"{run_dir} already holds a run; continue it with --resume {run_dir}")
    if given.get("action_repeat") == 0:
        del given["action_repeat"]  # 0 asks for the task's default.
    if resume:
        try:
            saved = read_config(Path(resume))
        except ValueError as error:
            parser.error(str(error))
        conflicts = [f"--{name.replace('_', '-')} {value} (the run has {getattr(saved, name)})"
                     for name, value in given.items()
                     if name not in RESUME_MAY_CHANGE and value != getattr(saved, name)]
        if conflicts:
            parser.error("a resumed run keeps its config; refused: " + ", ".join(conflicts))
        config = dataclasses.replace(saved, **given)
    else:
        try:
            config = Config(**apply_preset(given))
        except ValueError as error:
            parser.error(str(error))
    try:
        parse_task(config.task)
        resolve_device(config.device)
    except ValueError as error:
        parser.error(str(error))
    too_small = [f"--{name.replace('_', '-')}" for name in POSITIVE if getattr(config, name) < 1]
    if too_small:
        parser.error(f"{', '.join(too_small)} must be at least 1")
    if config.overshooting_distance == 1 or config.overshooting_distance < 0:
        parser.error("--overshooting-distance must be 0 (off) or at least 2: overshooting adds the "
                     "KLs of d = 2..D to the one-step KL (d = 1) that the loss always has")
    if config.overshooting_distance and config.chunk_length < 2:
        parser.error("latent overshooting needs --chunk-length of at least 2")
    if config.overshooting_reward_scale and not config.overshooting_distance:
        parser.error("--overshooting-reward-scale needs --overshooting-distance: it overshoots the "
                     "reward on the latent overshooting rollouts")
    if min(config.overshooting_reward_scale, config.global_kl_beta, config.overshooting_kl_beta) < 0:
        parser.error("--overshooting-kl-beta, --overshooting-reward-scale and --global-kl-beta "
                     "must be at least 0")
    if config.nan_policy not in ("stop", "skip"):
        parser.error("--nan-policy must be stop or skip")
    if config.model not in MODELS:
        parser.error(f"--model must be one of {', '.join(MODELS)}")
    if config.gru_cell not in GRU_CELLS:
        parser.error(f"--gru-cell must be one of {', '.join(GRU_CELLS)}")
    if config.init not in INITS:
        parser.error(f"--init must be one of {', '.join(INITS)}")
    if config.state_heads not in STATE_HEADS:
        parser.error(f"--state-heads must be one of {', '.join(STATE_HEADS)}")
    if config.reward_alignment not in ("incoming", "outgoing"):
        parser.error("--reward-alignment must be incoming or outgoing")
    if not 0 < config.planner_discount <= 1:
        parser.error("--planner-discount must be in (0, 1]")
    if config.collect not in ("planner", "random"):
        parser.error("--collect must be planner or random")
    if config.top_candidates > config.candidates:
        parser.error("--top-candidates must not exceed --candidates")
    config.action_repeat = config.action_repeat or default_action_repeat(config.task)
    # Outgoing rewards make each chunk from one more stored step (`build_replay`).
    stored = config.chunk_length + (config.reward_alignment == "outgoing")
    if stored > config.max_episode_length // config.action_repeat + 1:
        parser.error("--chunk-length is longer than an episode")
    return config, resume or run_dir, bool(resume)


def build_model(config, action_size, state_sizes=None):
    """The world model of `config` for an env's action size and the sizes of its proprioceptive
    observation (`DMCEnv.state_sizes`, needed by state heads)."""
    return WorldModel(action_size, config.belief_size, config.state_size, config.hidden_size,
                      config.cnn_depth, config.reward_hidden_size, config.model, config.bf16,
                      config.gru_cell, config.init, config.reward_layers, config.state_heads, state_sizes)


def build_replay(config, device, state_sizes=None):
    """The replay buffer: chunks of the frames, actions and rewards, and the proprioceptive states
    when state heads need them. Outgoing rewards make each chunk from one more stored step
    (`outgoing_reward_chunks`)."""
    keys = REPLAY_KEYS
    if config.state_heads != "none":
        keys += tuple(STATE_PREFIX + key for key in state_sizes)
    length = config.chunk_length + (config.reward_alignment == "outgoing")
    if config.replay_on_device:
        return DeviceReplayBuffer(length, config.buffer_capacity, config.seed, device, keys)
    return ReplayBuffer(length, config.buffer_capacity, config.seed, keys)


# --- Reading runs back. Each raises ValueError with a one-line reason. ---

def read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json")
    try:
        saved = json.loads(path.read_text())
        return Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a valid config: {error}") from None


def read_checkpoint(run_dir, config, model, device):
    """Load the run's checkpoint into `model` and return it, after checking that it belongs to
    this config (task and model sizes)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {CHECKPOINT} yet")
    try:
        # On the CPU: generator states must be CPU tensors; load_state_dict moves the rest.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # A truncated or foreign file fails in many ways.
        raise ValueError(f"{path} is unreadable ({type(error).__name__}); "
                         "it is not a checkpoint written by train.py") from None
    saved = checkpoint.get("config", {}) if isinstance(checkpoint, dict) else {}
    # A setting missing from an older checkpoint had its default then.
    mismatched = [f"{name} {saved.get(name, getattr(Config, name))} != {getattr(config, name)}"
                  for name in ("task", "model", "gru_cell", "belief_size", "state_size", "hidden_size",
                               "reward_hidden_size", "reward_layers", "state_heads", "cnn_depth")
                  if saved.get(name, getattr(Config, name)) != getattr(config, name)]
    if mismatched:
        raise ValueError(f"{path} does not match the model in config.json: {', '.join(mismatched)}")
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError):
        raise ValueError(f"{path} does not match the model in config.json") from None
    return checkpoint


def load_run(run_dir, device):
    """The config, the model (in eval mode) and the checkpoint of a run, e.g. one still training."""
    config = read_config(run_dir)
    set_matmul_precision(device, config.tf32)
    env = make_env(config.task)
    model = build_model(config, env.action_size, env.state_sizes).to(device)
    env.close()
    checkpoint = read_checkpoint(run_dir, config, model, device)
    model.eval()
    return config, model, checkpoint


# --- One update and C of them. ---

def compile_loss(model, device):
    """--compile-update: `model.loss` through `torch.compile`, which also compiles its backward
    (AOTAutograd). On CUDA both become CUDA graphs (`triton.cudagraphs`, what mode reduce-overhead
    sets), so that the L-step RSSM unroll launches as a few graphs instead of thousands of small
    kernels. Random draws stay eager PyTorch's (`fallback_random`): a seed gives the eager loss up
    to float rounding. Gradient clipping and Adam stay eager: a handful of multi-tensor kernels.
    Compiles at the first call."""
    cuda = torch.device(device).type == "cuda"
    options = {"fallback_random": True, **({"triton.cudagraphs": True} if cuda else {})}
    compiled = torch.compile(model.loss, dynamic=False, options=options)

    def loss(*args):
        if cuda:  # A new training step: the previous one's backward has run.
            torch.compiler.cudagraph_mark_step_begin()
        total, terms = compiled(*args)
        # A CUDA graph's outputs are overwritten by its next replay: keep copies of the terms.
        return total, {name: value.clone() for name, value in terms.items()}

    return loss


def update(model, optimizer, batch, config, step, loss_fn=None):
    """Gradient step number `step` (from 0) on a batch of preprocessed chunks `(obs, actions,
    rewards, *states)` on the model's device, as the replay gives them (`build_replay`), with
    `model.loss` or `loss_fn` (`compile_loss`). Returns the detached loss terms; no host sync
    unless --nan-policy skip, which must look at the loss before stepping."""
    warmup = min(1.0, step / config.warmup_updates) if config.warmup_updates else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * warmup
    obs, actions, rewards, *states = batch
    if config.reward_alignment == "outgoing":
        obs, actions, rewards, *states = outgoing_reward_chunks(obs, actions, rewards, *states)
    loss, terms = (loss_fn or model.loss)(obs, actions, rewards, config.free_nats, config.reward_scale,
                                          config.overshooting_distance, config.overshooting_kl_beta,
                                          config.overshooting_reward_scale, config.global_kl_beta,
                                          dict(zip(model.state_models, states)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    if config.nan_policy == "skip" and not torch.isfinite(loss + terms["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return terms


def train_model(model, optimizer, buffer, config, device, generator, first_update, loss_fn=None):
    """C updates on batches prefetched in the background, their dequantisation noise drawn from
    `generator`. Returns their mean terms; raises FloatingPointError naming the first non-finite
    update unless --nan-policy skip."""
    model.train()
    start = time.perf_counter()
    batches = BatchPrefetcher(buffer, config.batch_size, config.collect_interval, device,
                              config.bit_depth, generator)
    history = [update(model, optimizer, batch, config, first_update + i, loss_fn)
               for i, batch in enumerate(batches)]
    model.eval()
    terms = {name: torch.stack([h[name] for h in history]).cpu() for name in history[0]}
    finite = torch.stack(list(terms.values())).isfinite().all(0)
    if not finite.all() and config.nan_policy == "stop":
        bad = int((~finite).nonzero()[0])
        values = ", ".join(f"{name} {float(v[bad]):.4g}" for name, v in terms.items())
        raise FloatingPointError(f"non-finite loss at update {first_update + bad + 1}: {values}; "
                                 "the last checkpoint is untouched")
    metrics = {("train/" if name == "grad_norm" else "loss/") + name: float(v[finite].mean())
               for name, v in terms.items() if finite.any()}
    metrics["train/skipped_updates"] = int((~finite).sum())
    metrics["speed/updates_per_s"] = config.collect_interval / (time.perf_counter() - start)
    return metrics


def test_seeds(seed, first_index, count):
    """Env seeds of the test episodes `first_index ...`: one per episode, so that a test does not
    depend on the tests before it, and apart from the training env's seed (the run's seed)."""
    return [derive_seed(seed, TEST_SEED_OFFSET, first_index + i) for i in range(count)]


def test(model, envs, config, first_index, run_dir):
    """Noise-free planner episodes in the parallel `envs`, one each, saved from `first_index` on.
    Returns the metrics (returns and the model's open-loop errors, see `open_loop_errors`) and a
    strip of ground truth (top) over open-loop prediction (bottom) for the first episode."""
    agent = Agent(model, config.planner, config.bit_depth, batch_size=envs.num_envs,
                  plan=config.plan(next(model.parameters()).device))
    episodes = play_episodes(envs, agent, test_seeds(config.seed, first_index, envs.num_envs))
    for i, episode in enumerate(episodes):
        save_episode(Path(run_dir) / "episodes" / "test", first_index + i, episode)
    returns = np.array([episode["reward"].sum() for episode in episodes])
    metrics = {"test/return": float(returns.mean()), "test/return_std": float(returns.std())}
    # Whether the model can plan yet: open-loop predictions over the planner's horizon.
    errors = open_loop_errors(model, episodes, config.horizon, bit_depth=config.bit_depth,
                              reward_offset=int(config.reward_alignment == "outgoing"))
    metrics.update({f"test/{name}": value for name, value in errors.items()})
    truth, prediction = open_loop_frames(model, episodes[0], context=5, length=50,
                                         bit_depth=config.bit_depth)
    strip = np.concatenate([np.concatenate(list(frames[::5]), axis=2) for frames in (truth, prediction)],
                           axis=1)
    return metrics, strip


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


class Workspace:
    """Everything a run holds: envs, model, optimizer, replay buffer, counters, generators, logs.

    After each episode: its file, then its metrics line and TensorBoard points, then the
    checkpoint. A resumed run rolls back to the checkpoint: what was written after it (an episode,
    a metrics line, TensorBoard points) is set aside or dropped, and happens again.
    """

    def __init__(self, config, run_dir, resume=False):
        self.config, self.run_dir = config, Path(run_dir)
        self.device = resolve_device(config.device)
        set_matmul_precision(self.device, config.tf32)
        set_seed_everywhere(config.seed)
        self.rng = np.random.default_rng(config.seed)  # Seed episodes' random actions.
        self.env = make_env(config.task, config.seed, config.action_repeat, config.max_episode_length)
        self.test_envs = None  # Worker processes, started at the first test.
        self.model = build_model(config, self.env.action_size, self.env.state_sizes).to(self.device).eval()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                          eps=config.adam_epsilon)
        self.loss_fn = compile_loss(self.model, self.device) if config.compile_update else None
        self.buffer = build_replay(config, self.device, self.env.state_sizes)
        # The batches' dequantisation noise: a stream of its own, apart from torch's global one.
        self.batch_noise = torch.Generator(self.device).manual_seed(derive_seed(config.seed, BATCH_NOISE_TAG))
        self.agent = Agent(self.model, config.planner, config.bit_depth, plan=config.plan(self.device))
        self.counters = {"episodes": 0, "env_steps": 0, "updates": 0, "test_episodes": 0}
        if resume:
            self.restore()
        write_json(self.run_dir / "config.json", dataclasses.asdict(config))  # --episodes may be new.
        # purge_step hides the TensorBoard points that a killed process logged after the checkpoint.
        self.writer = SummaryWriter(str(self.run_dir),
                                    purge_step=self.counters["env_steps"] + 1 if resume else None)
        if not resume:
            self.writer.add_text("hyperparameters", hyperparameter_table(config))

    # --- Checkpoints. ---

    def save(self):
        state = {
            "config": dataclasses.asdict(self.config), "counters": dict(self.counters),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {**global_rng_state(), "actions": self.rng.bit_generator.state,
                    "replay": self.buffer.rng.bit_generator.state,
                    "batch_noise": self.batch_noise.get_state(), "device": self.device.type,
                    "env": pack_random_state(self.env.get_rng_state())},
        }
        data = io.BytesIO()
        torch.save(state, data)  # In memory first, so that a full disk fails as an OSError below.
        try:
            atomic_write(self.run_dir / CHECKPOINT, lambda f: f.write(data.getbuffer()))
        except OSError as error:
            raise OSError(f"could not write {self.run_dir / CHECKPOINT} ({error.strerror}); the "
                          f"previous checkpoint is intact, resume from it with --resume {self.run_dir}") from None

    def restore(self):
        if not (self.run_dir / CHECKPOINT).exists():  # Killed before the first checkpoint.
            logging.info("%s has no checkpoint yet: starting it over", self.run_dir)
            self._roll_back_files()
            return
        checkpoint = read_checkpoint(self.run_dir, self.config, self.model, self.device)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.counters = dict(checkpoint["counters"])
        self._roll_back_files()
        for path in episode_paths(self.run_dir / "episodes" / "train"):
            try:
                self.buffer.add(load_episode(path))
            except Exception as error:  # Truncated, bit rot, foreign file: report and go on.
                logging.warning("skipping unreadable episode %s (%s)", path, type(error).__name__)
        rng = checkpoint["rng"]
        set_global_rng_state(rng)
        self.rng.bit_generator.state = rng["actions"]
        self.buffer.rng.bit_generator.state = rng["replay"]
        if rng.get("device") == self.device.type:
            self.batch_noise.set_state(rng["batch_noise"])
        else:  # Resumed on another kind of device, whose generators have other states.
            updates = self.counters["updates"]
            self.batch_noise.manual_seed(derive_seed(self.config.seed, BATCH_NOISE_TAG, updates))
            reseeded = ["the batch noise"]
            if self.device.type == "cuda":  # Else at the run's seed, or where a CPU run left them.
                torch.cuda.manual_seed_all(derive_seed(self.config.seed, CUDA_RESEED_TAG, updates))
                reseeded.append("the CUDA generators (posterior samples, planning)")
            logging.warning("resumed on %s from a checkpoint written on %s: reseeded %s; the run goes "
                            "on, but its random draws are no longer those of an unbroken run",
                            self.device.type, rng.get("device", "cpu"), " and ".join(reseeded))
        self.env.set_rng_state(unpack_random_state(rng["env"]))
        logging.info("resumed %s after %d episodes, %d env steps, %d updates; %d steps in replay",
                     self.run_dir, self.counters["episodes"], self.counters["env_steps"],
                     self.counters["updates"], self.buffer.steps)

    def _roll_back_files(self):
        """Set aside the episodes and drop the metrics written after the checkpoint."""
        for kind, kept in (("train", self.counters["episodes"]), ("test", self.counters["test_episodes"])):
            for path in episode_paths(self.run_dir / "episodes" / kind):
                if episode_index(path) >= kept:
                    aside = self.run_dir / "episodes" / "discarded" / kind
                    aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, aside / path.name)
                    logging.info("set aside %s: it was written after the checkpoint", path)
        metrics = self.run_dir / "metrics.jsonl"
        write_jsonl(metrics, [r for r in read_jsonl(metrics) if r.get("episodes", 0) <= self.counters["episodes"]])

    # --- The loop. ---

    def train(self):
        config, counters = self.config, self.counters
        progress = tqdm(total=config.episodes, initial=counters["episodes"], unit="episode",
                        dynamic_ncols=True)
        while counters["episodes"] < config.episodes:
            metrics = {}
            seeding = counters["episodes"] < config.seed_episodes
            if not seeding and not self.buffer.chunk_count():
                # Every episode so far ended (terminated) before L steps: nothing to train on yet.
                logging.warning("no episode in replay holds a chunk of %d steps yet: collecting "
                                "episode %d before any update", self.buffer.chunk_length, counters["episodes"] + 1)
            elif not seeding:
                metrics = train_model(self.model, self.optimizer, self.buffer, config, self.device,
                                      self.batch_noise, counters["updates"], self.loss_fn)
                counters["updates"] += config.collect_interval
            if seeding or config.collect == "random":
                policy = random_policy(self.env.action_size, self.rng)
            else:
                policy = planner_policy(self.agent, config.action_noise)
            start = time.perf_counter()
            episode = play_episode(self.env, policy)
            metrics["speed/fps"] = self.env.steps / (time.perf_counter() - start)
            save_episode(self.run_dir / "episodes" / "train", counters["episodes"], episode)
            self.buffer.add(episode)
            counters["episodes"] += 1
            counters["env_steps"] += self.env.steps
            metrics["train/return"] = float(episode["reward"].sum())
            # Every test_interval episodes, and after the last: the paper's final score.
            if counters["episodes"] > config.seed_episodes and (
                    counters["episodes"] % config.test_interval == 0 or counters["episodes"] == config.episodes):
                if self.test_envs is None:
                    self.test_envs = make_parallel_envs(config.task, config.test_episodes, config.action_repeat,
                                                        config.max_episode_length)
                test_metrics, strip = test(self.model, self.test_envs, config, counters["test_episodes"],
                                           self.run_dir)
                counters["test_episodes"] += config.test_episodes
                metrics.update(test_metrics)
                self.writer.add_image("test/open_loop_prediction", strip, counters["env_steps"])
            self.log(metrics)
            if counters["episodes"] % config.checkpoint_interval == 0 or counters["episodes"] == config.episodes:
                self.save()
            progress.update(1)
            progress.set_postfix({name.split("/")[0]: round(metrics[name], 1)
                                  for name in ("train/return", "test/return") if name in metrics})
        progress.close()

    def close(self):
        self.writer.close()
        self.env.close()
        if self.test_envs is not None:
            self.test_envs.close()
            self.test_envs = None

    def log(self, metrics):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, self.counters["env_steps"])
        self.writer.flush()
        append_jsonl(self.run_dir / "metrics.jsonl", {**self.counters, **metrics})


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    keep_freed_memory()
    config, run_dir, resume = parse_args(argv)
    try:
        run_dir = Path(run_dir) if run_dir else make_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        workspace = Workspace(config, run_dir, resume=resume)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    if workspace.counters["episodes"] >= config.episodes:
        logging.info("%s already has %d episodes; raise --episodes to train longer",
                     run_dir, workspace.counters["episodes"])
        workspace.close()
        return
    logging.info("run directory: %s (device %s)", run_dir, workspace.device)
    try:
        workspace.train()
    except (FloatingPointError, OSError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; continue with: python train.py --resume {run_dir}")
    finally:
        workspace.close()
    logging.info("done: %s", run_dir)


if __name__ == "__main__":
    main()
