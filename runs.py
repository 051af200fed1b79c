"""A run as its Config and files define it: the envs, world model and replay buffer it builds, its
directory, its checkpoint read back and the seeds of its test episodes. Shared by train.py, test.py,
video_prediction.py and bench.py.
"""
import time
from pathlib import Path

import torch

from agent import STATE_PREFIX
from config import Config, read_config
from model import WorldModel
from utils import REPLAY_KEYS, DeviceReplayBuffer, ReplayBuffer, derive_seed, set_matmul_precision
from wrappers import make_env

CHECKPOINT = "checkpoint.pt"
TEST_SEED_OFFSET = 10_000  # Tags the stream of test-episode seeds, apart from training's.


def build_env(config, seed=0, frames=False, max_episode_length=None, task=None, action_size=None):
    """The env of one of the run's tasks (the first by default) with the given seed, seen as the run
    sees it (`make_env`)."""
    task = task or config.tasks[0]
    return make_env(task, seed, config.repeat_of(task), max_episode_length or config.max_episode_length,
                    config.obs, frames, action_size)


def padded_action_size(config):
    """The action size of a multi-task run, its widest task's (`build_envs`); None for one task."""
    if len(config.tasks) == 1:
        return None
    envs = [build_env(config, task=task) for task in config.tasks]
    for env in envs:
        env.close()
    return max(env.action_size for env in envs)


def build_envs(config, seed=0):
    """One env per task of the run; in a multi-task run each takes the widest task's actions
    (`TaskEnv.pad_actions`), so that one model and one planner serve them all."""
    size = padded_action_size(config)
    return [build_env(config, seed, task=task, action_size=size) for task in config.tasks]


def build_model(config, env):
    """The world model of `config` for an env: its action size, its observation's size when seen
    from states, and the sizes of its proprioceptive observation (`state_sizes`, for state heads)."""
    obs_size = env.observation_space.shape[0] if config.obs == "state" else None
    return WorldModel(env.action_size, config.belief_size, config.state_size, config.hidden_size,
                      config.cnn_depth, config.reward_hidden_size, config.model, config.bf16,
                      config.gru_cell, config.init, config.reward_layers, config.state_heads,
                      env.state_sizes, obs_size, config.embed_size, config.uses_termination_head)


def build_replay(config, device, state_sizes=None):
    """The replay buffer: chunks of the frames, actions and rewards, the proprioceptive states
    when state heads need them, and where episodes may end early the terminations and the valid
    steps of padded chunks. Outgoing rewards make each chunk from one more stored step
    (`outgoing_reward_chunks`)."""
    keys = REPLAY_KEYS
    if config.state_heads != "none":
        keys += tuple(STATE_PREFIX + key for key in state_sizes)
    length = config.chunk_length + (config.reward_alignment == "outgoing")
    by_episode = len(config.tasks) > 1  # Each task its share of the chunks (`ReplayBuffer`).
    # Envs that end early give padded chunks, with their terminations and valid steps.
    if config.replay_on_device:
        return DeviceReplayBuffer(length, config.buffer_capacity, config.seed, device, keys, by_episode,
                                  config.ends_early)
    return ReplayBuffer(length, config.buffer_capacity, config.seed, keys, by_episode, config.ends_early)


# --- Reading runs back. Each raises ValueError with a one-line reason. ---

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
                  for name in ("task", "obs", "model", "gru_cell", "belief_size", "state_size", "hidden_size",
                               "reward_hidden_size", "reward_layers", "state_heads", "cnn_depth", "embed_size")
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
    config = read_config(run_dir).for_device(device)
    set_matmul_precision(device, config.tf32)
    envs = build_envs(config)
    model = build_model(config, envs[0]).to(device)
    for env in envs:
        env.close()
    checkpoint = read_checkpoint(run_dir, config, model, device)
    model.eval()
    return config, model, checkpoint


def make_run_dir(config):
    """A new directory `<log-dir>/<task>/<time>/` for a run, suffixed when one started this second."""
    root = Path(config.log_dir) / config.task
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = root / stamp, 1
    while run_dir.exists():
        run_dir, suffix = root / f"{stamp}-{suffix}", suffix + 1
    run_dir.mkdir(parents=True)
    return run_dir


def test_seeds(seed, first_index, count):
    """Env seeds of the test episodes `first_index ...`: one per episode, so that a test does not
    depend on the tests before it, and apart from the training env's seed (the run's seed)."""
    return [derive_seed(seed, TEST_SEED_OFFSET, first_index + i) for i in range(count)]
