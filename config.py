"""Every setting of a run, in one place: `Config` (the official code's values as defaults), the
named presets, and the command line of `train.py` that makes a Config, or reads a run's back.
"""
import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agent import captured_cem_plan, cem_plan, compiled_rollout_returns, rollout_returns
from model import GRU_CELLS, INITS, MODELS, STATE_HEADS
from utils import resolve_device
from wrappers import GYM_PREFIX, check_task, default_action_repeat, parse_task, task_list

POSITIVE = ("episodes", "seed_episodes", "collect_interval", "batch_size", "chunk_length",
            "max_episode_length", "buffer_capacity", "horizon", "iterations", "candidates",
            "top_candidates", "test_interval", "test_episodes", "checkpoint_interval", "belief_size",
            "state_size", "hidden_size", "reward_hidden_size", "reward_layers", "cnn_depth", "embed_size",
            "bit_depth")
# Every other setting stays the run's own on --resume.
SPEED_PATHS = ("capture_planner", "capture_update", "compile_update", "replay_on_device", "tf32", "bf16")
# The speed paths on by default on CUDA, each because it passed its device tests on an H200 and was
# faster there (docs/speed.md, "On a GPU"). A path left unset (None) takes its device's default:
# this on CUDA, off on a CPU. A flag given (`--tf32`, `--no-tf32`) wins.
CUDA_DEFAULTS = {}
RESUME_MAY_CHANGE = ("episodes", "device", "nan_policy", "compile_planner", "wandb") + SPEED_PATHS


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run. Defaults are the official code's (paper Appendix A)."""

    task: str = option("cheetah-run", "dm_control task as domain-task, e.g. cartpole-swingup, cup-catch; "
                       "or gym:ID, a registered Gymnasium env, e.g. gym:Pendulum-v1; several, "
                       "comma-separated, or all (the paper's six of Figure 6) train one agent on them all")
    obs: str = option("pixels", "what the agent sees: pixels (64x64 images, the paper's) or state "
                      "(the env's observation vector, with MLP encoder and decoder)")
    seed: int = option(0, "seed of the environments, the models and the replay sampling")
    log_dir: str = option("log", "root of the run directories, <log-dir>/<task>/<timestamp>")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    # Schedule.
    episodes: int = option(1000, "total episodes to collect, seed episodes included")
    seed_episodes: int = option(5, "episodes with uniform random actions before training, per task")
    collect_interval: int = option(100, "model updates (C) before each collected episode")
    batch_size: int = option(50, "sequences per update (B)")
    chunk_length: int = option(50, "steps per sequence (L)")
    action_repeat: int = option(0, "physics steps per action; 0: the paper's value for the task (in a "
                                "multi-task run, for each task)")
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
    # checks it on the device: `python bench.py --check` runs them there). None: the device's
    # default (`CUDA_DEFAULTS` on CUDA, off on a CPU), decided when the run starts (`for_device`).
    capture_planner: bool = option(None, "capture the whole CEM call as one CUDA graph per batch "
                                   "size (no compiler; with --compile-planner its rollout compiled "
                                   "inside); on a CPU, which has no graphs, torch.compile the whole call")
    capture_update: bool = option(None, "capture the loss and its backward as one CUDA graph of the "
                                  "whole L-step unroll (no compiler); CUDA only, eager on a CPU")
    compile_update: bool = option(None, "torch.compile the loss, and so its backward (minutes to "
                                  "compile); on CUDA also captured as one CUDA graph")
    replay_on_device: bool = option(None, "keep the replay buffer on the device (uint8 frames) and "
                                    "sample batches by indexing there, with no host copy")
    tf32: bool = option(None, "CUDA only: float32 matmuls and convolutions on TF32 tensor cores "
                        "(off: full float32, convolutions included)")
    bf16: bool = option(None, "run the encoder and decoder under bf16 autocast (outputs, RSSM and "
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
    termination_head: bool = option(None, "a head that predicts whether the episode is still running, "
                                    "trained on the env's terminations, by which the planner weighs "
                                    "each predicted reward (Dreamer's discount predictor; beyond the "
                                    "paper); default on for Gymnasium envs, off for the Control Suite, "
                                    "which never terminates")
    continue_scale: float = option(10.0, "weight of the termination head's log-likelihood "
                                   "(Dreamer's pcont_scale)")
    cnn_depth: int = option(32, "channels of the first conv layer of encoder and decoder")
    embed_size: int = option(1024, "from states (--obs state): the embed size and the width of the "
                             "MLP encoder and decoder, two hidden layers each (Kaixhin/PlaNet's)")
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
    wandb: bool = option(False, "also log to Weights & Biases what TensorBoard gets, and the config "
                         "(project planet-torch or $WANDB_PROJECT; WANDB_MODE=offline writes it to "
                         "RUN_DIR/wandb)")

    @property
    def ends_early(self):
        """Whether an episode may end before its time limit: a Gymnasium env can terminate (a
        robot falls), a Control Suite task never does. Its chunks are then padded (`ReplayBuffer`)."""
        return any(task.startswith(GYM_PREFIX) for task in self.tasks)

    @property
    def uses_termination_head(self):
        """`termination_head`, or when unset (a Config made in code), its default: on where
        episodes may end early."""
        return self.ends_early if self.termination_head is None else self.termination_head

    @property
    def tasks(self):
        """The run's tasks: one, or several for one agent (`task_list`)."""
        return task_list(self.task)

    def repeat_of(self, task):
        """The action repeat of one of the run's tasks."""
        return self.action_repeat or default_action_repeat(task)

    @property
    def planner(self):
        """The keyword arguments of `cem_plan`."""
        # Captured, the call passes the compiled rollout itself (CUDA) or compiles whole (CPU).
        compiled = self.compile_planner and not self.capture_planner
        return {"horizon": self.horizon, "iterations": self.iterations,
                "candidates": self.candidates, "top_candidates": self.top_candidates,
                "discount": self.planner_discount,
                "rollout": compiled_rollout_returns() if compiled else rollout_returns}

    def plan(self, device):
        """The CEM function that agents on `device` call with `planner`."""
        if not self.capture_planner:
            return cem_plan
        return captured_cem_plan(torch.device(device).type, self.compile_planner)

    def for_device(self, device):
        """This config with each speed path left unset (None) set to `device`'s default: on CUDA
        `CUDA_DEFAULTS`, elsewhere off. The run keeps None in its config.json, so that a run
        resumed on another device takes that device's defaults."""
        cuda = torch.device(device).type == "cuda"
        return dataclasses.replace(self, **{
            name: (CUDA_DEFAULTS.get(name, False) if cuda else False)
            for name in SPEED_PATHS if getattr(self, name) is None})

    def speed_paths(self):
        """The names of the speed paths that are on."""
        return [name for name in SPEED_PATHS if getattr(self, name)]


# Smaller settings for a machine without a GPU. Each keeps the paper's method (the same model
# family, loss and CEM planner) and shrinks only what costs time. `small` trains cartpole-swingup
# for 80 episodes: about 2 h 45 min on 2 CPU cores, from the per-episode times below. docs/results.md
# shows what it reaches and, under "Learning on a CPU", how its values were chosen.
PRESETS = {
    "small": {
        "batch_size": 16,  # B x L = 800 frames per update instead of 2500.
        "collect_interval": 50,  # C: updates per collected episode.
        "candidates": 200, "top_candidates": 20, "iterations": 5,  # J, K, I; the horizon stays 12.
        "test_interval": 5, "test_episodes": 5,
        "cnn_depth": 16,  # Encoder/decoder channels 16..128: an update is 2.6x faster on a CPU.
        "episodes": 80,  # Measured alone on 2 cores: 106 s per episode, 124 s per test.
    },
    # Learning from states (`--obs state`) on a CPU, where the CEM call is most of the time: it
    # scales with J x I x H and the RSSM's widths. Measured on 1 core of the 2-core VM (docs/results.md,
    # "From states"): with the widths at 200 a CEM call took 318 ms, with 100 86 ms.
    "small-state": {
        "obs": "state",
        "batch_size": 16, "collect_interval": 50,
        "candidates": 200, "top_candidates": 20, "iterations": 5,
        "test_interval": 5, "test_episodes": 5,
        # 100 units, as the camera-ready version's `feed_forward` heads (networks/basic.py).
        "belief_size": 100, "hidden_size": 100, "reward_hidden_size": 100, "embed_size": 100,
        "episodes": 40,  # Half an hour per seed; cartpole-swingup reaches 3.6x random actions.
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
    nothing for another task or for a multi-task run, whose tasks keep their own; nor do state heads
    apply to a multi-task run (it says so of both).
    Raises ValueError for an unknown preset or task."""
    names = [name for name in given.get("preset", "").split(",") if name]
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise ValueError(f"unknown --preset {', '.join(unknown)}; known presets: {', '.join(PRESETS)}")
    tasks = [parse_task(task) for task in task_list(given.get("task", Config.task))]
    settings = {}
    for name in names:
        by_task = {key: value for key, value in PRESETS[name].items() if isinstance(value, dict)}
        if len(tasks) > 1 and by_task:
            logging.info("preset %s: in a multi-task run each task keeps its own %s", name, ", ".join(by_task))
        chosen = {key: value.get(tasks[0]) if len(tasks) == 1 else None for key, value in by_task.items()}
        if len(tasks) > 1 and "state_heads" in PRESETS[name]:  # As the official multi-task run has none.
            logging.info("preset %s: a multi-task run has no state heads", name)
            chosen["state_heads"] = None
        chosen = {key: value for key, value in {**PRESETS[name], **chosen}.items() if value is not None}
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
        default = (f"{'on' if CUDA_DEFAULTS.get(f.name) else 'off'} on CUDA, off on a CPU"
                   if f.name in SPEED_PATHS else f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kind,
                            help=f"{f.metadata['help']} (default: {default})")
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
        check_task(config.task, config.obs)
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
    if len(config.tasks) > 1 and config.state_heads != "none":
        parser.error("a multi-task run has no state heads: its tasks' states differ (the official code "
                     "keeps only the image and the reward, 0c6f7d3 scripts/configs.py:103-113)")
    if len(config.tasks) == 1:  # A multi-task run keeps 0: each task its own.
        config.action_repeat = config.repeat_of(config.task)
    config.termination_head = config.uses_termination_head
    if config.continue_scale < 0:
        parser.error("--continue-scale must be at least 0")
    # Outgoing rewards make each chunk from one more stored step (`build_replay`).
    stored = config.chunk_length + (config.reward_alignment == "outgoing")
    if any(stored > config.max_episode_length // config.repeat_of(task) + 1 for task in config.tasks):
        parser.error("--chunk-length is longer than an episode")
    return config, resume or run_dir, bool(resume)


def read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json")
    try:
        saved = json.loads(path.read_text())
        saved.setdefault("termination_head", False)  # Runs from before the head existed had none.
        return Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a valid config: {error}") from None
