import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "egl")

# A configuration small enough to train, test and predict in seconds on a CPU: short episodes,
# small networks and a small planner, but the real dm_control env with real rendering.
TINY_MODEL = {"belief_size": 16, "state_size": 4, "hidden_size": 16, "reward_hidden_size": 16,
              "cnn_depth": 4}
TINY_FLAGS = [
    "--task", "cartpole-swingup", "--max-episode-length", "200", "--episodes", "4",
    "--seed-episodes", "2", "--collect-interval", "3", "--batch-size", "4", "--chunk-length", "8",
    "--horizon", "3", "--iterations", "2", "--candidates", "16", "--top-candidates", "4",
    "--test-interval", "2", "--test-episodes", "2", "--checkpoint-interval", "1", "--device", "cpu",
] + [arg for name, value in TINY_MODEL.items() for arg in ("--" + name.replace("_", "-"), str(value))]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests marked `device` (cpu, cuda or cuda:N); the check of "
                          "`python bench.py --check` runs them on the GPU with -m device")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on --device; compares it with the CPU and the "
                                       "speed paths with eager PyTorch")


@pytest.fixture
def device(request):
    import torch
    from utils import resolve_device
    try:
        return resolve_device(request.config.getoption("--device"))
    except ValueError as error:
        pytest.exit(f"pytest --device: {error}", returncode=4)


@pytest.fixture
def tiny_model():
    from model import WorldModel
    return WorldModel(action_size=2, **TINY_MODEL)


def make_episode(episode_id, length, action_size=2):
    """Frames stamped with (episode id, step) so that a chunk shows where it came from."""
    obs = np.zeros((length + 1, 3, 64, 64), np.uint8)
    obs[:, 0, 0, 0] = episode_id
    obs[:, 0, 0, 1] = np.arange(length + 1)
    action = np.full((length + 1, action_size), episode_id, np.float32)
    action[0] = 0
    reward = np.arange(length + 1, dtype=np.float32)
    return {"obs": obs, "action": action, "reward": reward}
