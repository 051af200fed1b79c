"""The CEM planner on a toy objective, and the acting loop's data alignment with the real env."""
import numpy as np
import pytest
import torch

from agent import Agent, cem_plan, planner_policy, play_episode
from conftest import TINY_MODEL
from model import WorldModel
from wrappers import make_env


class ToyDynamics:
    """A stand-in RSSM whose 'belief' carries each agent's target action: features are the
    candidate action minus the target, so the reward -|feature|^2 peaks at the target."""

    def __init__(self, action_size):
        self.action_size = action_size

    def imagine(self, actions, belief, state):
        return actions - belief, state.expand(len(actions), *state.shape)


def toy_reward(feature):
    return -(feature ** 2).sum(-1)


def test_cem_finds_the_optimum_of_each_agent():
    torch.manual_seed(0)
    targets = torch.tensor([[0.5, -0.3, 0.8], [-0.7, 0.2, 0.0], [1.5, -2.0, 0.3]])
    state = torch.zeros(3, 0)
    action = cem_plan(ToyDynamics(3), toy_reward, targets, state, horizon=4, iterations=10,
                      candidates=1000, top_candidates=100)
    assert action.shape == (3, 3)
    # Targets outside [-1, 1] are reached at the clip boundary: candidates are clipped.
    expected = targets.clamp(-1, 1)
    torch.testing.assert_close(action, expected, atol=0.05, rtol=0)


def test_cem_with_one_iteration_is_only_the_mean_of_the_best():
    """After one iteration from N(0, 1), the plan is far from a target that more iterations reach."""
    torch.manual_seed(0)
    target = torch.full((1, 6), 0.9)
    one = cem_plan(ToyDynamics(6), toy_reward, target, torch.zeros(1, 0), horizon=2, iterations=1,
                   candidates=100, top_candidates=10)
    many = cem_plan(ToyDynamics(6), toy_reward, target, torch.zeros(1, 0), horizon=2, iterations=10,
                    candidates=100, top_candidates=10)
    assert (many - target).abs().max() < (one - target).abs().max()


def test_episode_alignment_with_the_real_env():
    """`action[t]` led to `obs[t]`, zeros at reset; replaying the actions reproduces every frame."""
    env = make_env("cartpole-swingup", seed=3, max_episode_length=80)
    rng = np.random.default_rng(0)
    seen = []

    def policy(obs, previous_action):
        seen.append(previous_action.copy())
        return rng.uniform(-2, 2, size=1)  # Out of range on purpose: the executed action is clipped.

    episode = play_episode(env, policy)
    assert episode["obs"].shape == (11, 3, 64, 64) and episode["obs"].dtype == np.uint8
    assert episode["action"].shape == (11, 1) and episode["reward"].shape == (11,)
    assert (episode["action"][0] == 0).all() and episode["reward"][0] == 0
    assert np.abs(episode["action"]).max() <= 1
    # The policy saw the executed (clipped) action that led to the observation it got.
    np.testing.assert_array_equal(np.stack(seen), episode["action"][:-1])
    replay = make_env("cartpole-swingup", seed=3, max_episode_length=80)
    obs, _ = replay.reset()
    np.testing.assert_array_equal(obs, episode["obs"][0])
    for t in range(1, 11):
        obs, reward, *_ = replay.step(episode["action"][t])
        np.testing.assert_array_equal(obs, episode["obs"][t])
        assert reward == pytest.approx(episode["reward"][t])


def test_agent_filters_with_the_executed_noisy_action():
    torch.manual_seed(0)
    env = make_env("cartpole-swingup", seed=0, max_episode_length=40)
    agent = Agent(WorldModel(action_size=1, **TINY_MODEL),
                  {"horizon": 3, "iterations": 2, "candidates": 8, "top_candidates": 2})
    observed, planned = [], []
    observe, act = agent.observe, agent.act
    agent.observe = lambda obs, action: observed.append(action.copy()) or observe(obs, action)
    # A deterministic stand-in for the exploration noise: the executed action is plan + 0.5, clipped.
    agent.act = lambda noise_std: planned.append(act(0.0)) or np.clip(planned[-1] + noise_std, -1, 1)
    episode = play_episode(env, planner_policy(agent, action_noise=0.5))
    assert len(episode["reward"]) == 6 and np.abs(episode["action"]).max() <= 1
    # The belief was updated with what the env executed (noise and clipping), not with the plan.
    np.testing.assert_array_equal(np.concatenate(observed), episode["action"][:-1])
    assert not np.allclose(np.concatenate(planned), episode["action"][1:])
