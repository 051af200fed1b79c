"""The world model's prediction diagnostics against step-by-step computations."""
import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, make_episode
from diagnostics import open_loop_errors
from model import WorldModel
from utils import preprocess_observation


@pytest.mark.parametrize("reward_offset", [0, 1])
def test_open_loop_errors_match_a_step_by_step_computation(reward_offset, monkeypatch):
    """Every start t, every step ahead k: the prior from the posterior at t, driven by the actions
    that led to t+1 .. t+k, predicts reward[t+k] (reward[t+k+1] for outgoing rewards), obs[t+k]
    and, through the state heads, the proprioceptive state at t+k. Sampling is switched off
    (samples = means) so that the two computations see the same states."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    torch.manual_seed(1)
    tiny_model = WorldModel(2, **TINY_MODEL, state_heads="diagnostic", state_sizes={"position": 3})
    rng = np.random.default_rng(0)
    episodes = []
    for length in (20, 17):
        episode = make_episode(0, length)
        episode["obs"] = rng.integers(0, 256, episode["obs"].shape, dtype=np.uint8)
        episode["action"] = rng.uniform(-1, 1, episode["action"].shape).astype(np.float32)
        episode["reward"] = rng.normal(size=length + 1).astype(np.float32)
        episode["state_position"] = rng.normal(size=(length + 1, 3)).astype(np.float32)
        episodes.append(episode)
    horizon, stride = 4, 3
    torch.manual_seed(0)  # The dequantisation noise of the frames.
    errors = open_loop_errors(tiny_model, episodes, horizon, stride, reward_offset=reward_offset)
    torch.manual_seed(0)
    squared = {"reward_mse_open_loop": [], "reward_mse_posterior": [], "image_mse_open_loop": [],
               "state_position_mse_open_loop": [], "state_position_mse_filtered": []}
    targets, frames, positions = [], [], []
    head = tiny_model.state_models["position"]
    with torch.no_grad():
        for episode in episodes:
            obs = preprocess_observation(torch.as_tensor(episode["obs"]))
            actions = torch.as_tensor(episode["action"])
            belief, state = tiny_model.rssm.initial(1, "cpu")
            filtered = []
            for t in range(len(obs)):
                belief, _, posterior = tiny_model.rssm.obs_step(state, actions[t:t + 1], belief,
                                                                tiny_model.encoder(obs[t:t + 1]))
                state = posterior.sample
                filtered.append((belief, state))
            starts = range(0, len(obs) - horizon - reward_offset, stride)
            noise = torch.randn(horizon, len(starts), 4)  # As one `imagine` of all starts draws it.
            for i, t in enumerate(starts):
                belief, state = filtered[t]
                for k in range(1, horizon + 1):
                    belief, prior = tiny_model.rssm.img_step(state, actions[t + k:t + k + 1], belief,
                                                             noise[k - 1, i:i + 1])
                    state = prior.sample
                    imagined = torch.cat([state, belief], -1)
                    closed = torch.cat([filtered[t + k][1], filtered[t + k][0]], -1)
                    reward = float(episode["reward"][t + k + reward_offset])
                    position = episode["state_position"][t + k]
                    squared["state_position_mse_open_loop"].append(
                        float((head(imagined)[0] - torch.as_tensor(position)).square().mean()))
                    squared["state_position_mse_filtered"].append(
                        float((head(closed)[0] - torch.as_tensor(position)).square().mean()))
                    positions.append(position)
                    predicted = float(tiny_model.reward_model(imagined)), float(tiny_model.reward_model(closed))
                    squared["reward_mse_open_loop"].append((predicted[0] - reward) ** 2)
                    squared["reward_mse_posterior"].append((predicted[1] - reward) ** 2)
                    squared["image_mse_open_loop"].append(
                        float((tiny_model.observation_model(imagined)[0] - obs[t + k]).square().mean()))
                    targets.append(reward)
                    frames.append(obs[t + k].numpy())
    expected = {name: np.mean(values) for name, values in squared.items()}
    expected["reward_mse_constant"] = np.var(targets)
    expected["image_mse_constant"] = np.mean((frames - np.mean(frames, 0)) ** 2)
    expected["state_position_mse_constant"] = np.mean(np.var(positions, 0))
    starts = sum(len(range(0, length + 1 - horizon - reward_offset, stride)) for length in (20, 17))
    assert len(targets) == horizon * starts
    assert errors == pytest.approx(expected, rel=1e-4)
