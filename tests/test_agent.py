"""The CEM planner on a toy objective, and the acting loop's data alignment with the real env."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from agent import (Agent, cem_plan, compiled_rollout_returns, planner_policy,
                   play_episode, play_episodes, rollout_returns)
from conftest import TINY_MODEL
from inductor_pass import BiasAfterMatmul
from model import WorldModel, features
from wrappers import make_env, make_parallel_envs


class ToyDynamics:
    """A stand-in RSSM whose 'belief' carries each agent's target action."""

    def __init__(self, action_size):
        self.action_size = action_size


def toy_rollout(rssm, reward_model, actions, belief, state, discount=1.0):
    """Returns -|action - target|^2 summed over the horizon: they peak at each agent's target."""
    return -((actions - belief) ** 2).sum((0, 2))


def toy_plan(targets, **planner):
    return cem_plan(ToyDynamics(targets.shape[1]), None, targets, torch.zeros(len(targets), 0),
                    rollout=toy_rollout, **planner)


def test_cem_finds_the_optimum_of_each_agent():
    torch.manual_seed(0)
    targets = torch.tensor([[0.5, -0.3, 0.8], [-0.7, 0.2, 0.0], [1.5, -2.0, 0.3]])
    action = toy_plan(targets, horizon=4, iterations=10, candidates=1000, top_candidates=100)
    assert action.shape == (3, 3)
    # Targets outside [-1, 1] are reached at the clip boundary: candidates are clipped.
    expected = targets.clamp(-1, 1)
    torch.testing.assert_close(action, expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("top_candidates", [10, 1])
def test_cem_with_one_iteration_is_only_the_mean_of_the_best(top_candidates):
    """One iteration draws J sequences from N(0, I), clipped, and returns the first action of the
    mean of the K best; with K = 1 that is the best candidate's: random shooting."""
    targets = torch.tensor([[0.9, -0.2], [-0.5, 0.4]])
    horizon, candidates = 3, 100
    torch.manual_seed(0)
    plan = toy_plan(targets, horizon=horizon, iterations=1, candidates=candidates,
                    top_candidates=top_candidates)
    torch.manual_seed(0)
    sequences = torch.randn(horizon, len(targets), candidates, 2).clamp(-1, 1).numpy()
    for agent, target in enumerate(targets.numpy()):
        returns = -((sequences[:, agent] - target) ** 2).sum((0, 2))
        best = np.argsort(-returns)[:top_candidates]
        np.testing.assert_allclose(plan[agent], sequences[0, agent, best].mean(0), rtol=1e-6)
    if top_candidates == 1:
        assert np.isin(plan.numpy(), sequences[0]).all(), "random shooting returns a candidate's action"


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("discount", [1.0, 0.99, 0.5])
def test_rollout_returns_equal_the_summed_rewards_of_an_imagined_rollout(tiny_model, discount, stacked):
    """The planner's sum, step by step (a CPU's) or on the stacked features (a GPU's), is the
    reward model on `imagine`'s stacked rollout, the k-th step (from 0) weighted by discount^k
    (camera-ready's 0.99; 1 at HEAD)."""
    belief, state = torch.randn(7, 16), torch.randn(7, 4)
    actions = torch.rand(5, 7, 2) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(3)
        beliefs, states = tiny_model.rssm.imagine(actions, belief, state)
        weights = torch.tensor([discount ** k for k in range(5)])[:, None]
        expected = (weights * tiny_model.reward_model(features(beliefs, states))).sum(0)
        torch.manual_seed(3)
        returns = rollout_returns(tiny_model.rssm, tiny_model.reward_model, actions, belief, state, discount,
                                  stacked)
    torch.testing.assert_close(returns, expected)


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


def record_encoder_inputs(model):
    """The preprocessed frames `(B, 3, 64, 64)` of every call of the model's encoder, in a list."""
    frames = []
    model.encoder.register_forward_hook(lambda module, inputs, output: frames.append(inputs[0].clone()))
    return frames


def filtered_belief(model, frames, actions):
    """The belief after filtering frames `(T, 3, 64, 64)` with actions `(T, A)` from the start."""
    actions = torch.as_tensor(actions)[:, None]
    beliefs, _, _ = model.rssm.observe(model.encoder(frames[:, None]), actions,
                                       *model.rssm.initial(1, "cpu"))
    return beliefs[-1, 0]


def assert_frames_are_the_episodes(frames, obs, bit_depth=5):
    """Preprocessed frames are the episode's observations, dequantisation noise aside."""
    levels = torch.floor((frames + 0.5) * 2 ** bit_depth).to(torch.uint8)
    np.testing.assert_array_equal(levels.numpy(), obs >> (8 - bit_depth))


def test_exploration_noise_is_a_gaussian_of_the_given_std_then_clipped():
    """Agent.act adds N(0, 0.3^2) noise to the plan (std 0.3, not variance 0.3), then clips."""
    batch = 40_000
    plan = torch.zeros(batch, 2)
    agent = Agent(WorldModel(action_size=2, **TINY_MODEL), {}, batch_size=batch,
                  plan=lambda *args, **kwargs: plan)
    torch.manual_seed(0)
    np.testing.assert_array_equal(agent.act(), plan.numpy())
    noisy = agent.act(0.3)
    assert noisy.mean() == pytest.approx(0, abs=0.005) and noisy.std() == pytest.approx(0.3, abs=0.005)
    plan.fill_(0.9)
    clipped = agent.act(0.3)
    assert clipped.max() == 1 and clipped.min() > 0.9 - 6 * 0.3
    # P(0.9 + 0.3 z >= 1) = P(z >= 1/3) = 0.3694: the clipped share sits at exactly 1.
    assert (clipped == 1).mean() == pytest.approx(0.3694, abs=0.01)


def test_agent_filters_with_the_executed_noisy_action():
    """The planner policy plans, adds the exploration noise, executes the clipped result and
    updates the belief with what was executed. With the deterministic (`gru`) model the agent's
    final belief is the filter of the episode's frames and executed actions, step for step."""
    torch.manual_seed(0)
    env = make_env("cartpole-swingup", seed=0, max_episode_length=40)
    model = WorldModel(action_size=1, **TINY_MODEL, model="gru")
    plans = []

    def plan(*args, **kwargs):
        plans.append(cem_plan(*args, **kwargs))
        return plans[-1]

    agent = Agent(model, {"horizon": 3, "iterations": 2, "candidates": 8, "top_candidates": 2}, plan=plan)
    frames = record_encoder_inputs(model)
    episode = play_episode(env, planner_policy(agent, action_noise=0.5))
    assert len(episode["reward"]) == 6 and np.abs(episode["action"]).max() <= 1
    frames = torch.cat(frames)
    assert_frames_are_the_episodes(frames, episode["obs"][:-1])
    with torch.no_grad():
        torch.testing.assert_close(agent.belief[0], filtered_belief(model, frames, episode["action"][:-1]))
    executed, planned = episode["action"][1:], torch.cat(plans).numpy()
    assert np.abs(executed - planned).max() > 0.1, "the noise was executed"


def test_parallel_episodes_are_the_sequential_ones():
    """N envs in worker processes with one batched planner play, for each seed, the episode that
    one env with that seed replays frame by frame with the recorded actions, and each agent of the
    batch filtered its own episode (the `gru` model's filter draws nothing, so it is repeatable)."""
    torch.manual_seed(0)
    seeds = [11, 12, 13]
    model = WorldModel(action_size=1, **TINY_MODEL, model="gru")
    agent = Agent(model, {"horizon": 3, "iterations": 2, "candidates": 8, "top_candidates": 2},
                  batch_size=len(seeds))
    frames = record_encoder_inputs(model)
    with contextlib.closing(make_parallel_envs("cartpole-swingup", len(seeds), max_episode_length=48)) as envs:
        episodes = play_episodes(envs, agent, seeds)
    assert len(episodes) == 3
    frames = torch.stack(frames, 1)  # (N, T, 3, 64, 64)
    for i, (seed, episode) in enumerate(zip(seeds, episodes)):
        assert episode["obs"].shape == (7, 3, 64, 64) and episode["action"].shape == (7, 1)
        assert (episode["action"][0] == 0).all() and episode["reward"][0] == 0
        replay = make_env("cartpole-swingup", max_episode_length=48)
        obs, info = replay.reset(seed=seed)
        np.testing.assert_array_equal(obs, episode["obs"][0])
        for t in range(1, 7):
            for key, value in info["state"].items():  # Each env's own state, at the same step.
                np.testing.assert_array_equal(episode[f"state_{key}"][t - 1], value)
            obs, reward, _, _, info = replay.step(episode["action"][t])
            np.testing.assert_array_equal(obs, episode["obs"][t])
            assert reward == pytest.approx(episode["reward"][t])
        assert sorted(episode) == ["action", "obs", "reward", "state_position", "state_velocity", "terminal"]
        assert_frames_are_the_episodes(frames[i], episode["obs"][:-1])
        with torch.no_grad():
            expected = filtered_belief(model, frames[i], episode["action"][:-1])
        torch.testing.assert_close(agent.belief[i], expected, rtol=1e-5, atol=1e-5)
    # Different seeds start differently, and the agents planned for their own beliefs.
    assert not np.array_equal(episodes[0]["obs"][0], episodes[1]["obs"][0])
    assert not np.array_equal(episodes[0]["action"], episodes[1]["action"])


def test_compiled_rollout_is_the_same_function(tiny_model):
    """--compile-planner: the compiled rollout gives the eager returns and, seed for seed, the plan."""
    rssm, reward_model = tiny_model.rssm, tiny_model.reward_model
    belief, state = torch.randn(64, 16), torch.randn(64, 4)
    actions = torch.rand(4, 64, 2) * 2 - 1
    returns = {}
    for name, rollout in (("eager", rollout_returns), ("compiled", compiled_rollout_returns())):
        with torch.no_grad():
            torch.manual_seed(7)
            returns[name] = rollout(rssm, reward_model, actions, belief, state)
            torch.manual_seed(8)
            returns[name + " plan"] = cem_plan(rssm, reward_model, belief[:2], state[:2], horizon=4,
                                               iterations=3, candidates=32, top_candidates=4, rollout=rollout)
    torch.testing.assert_close(returns["compiled"], returns["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(returns["compiled plan"], returns["eager plan"], rtol=1e-4, atol=1e-4)


def test_bias_after_matmul_rewrites_addmm_only():
    """The compiler pass turns each plain addmm into mm + add and leaves the function unchanged."""
    weight, bias, weight_out = torch.randn(5, 3), torch.randn(5), torch.randn(5, 5)

    def layers(x):
        hidden = torch.relu(F.linear(x, weight, bias))
        return F.linear(hidden, weight_out, bias), torch.addmm(bias, x, weight.t(), beta=0.5)

    x = torch.randn(4, 3)
    graph_module = make_fx(layers)(x)
    BiasAfterMatmul()(graph_module.graph)
    graph_module.recompile()
    targets = [node.target for node in graph_module.graph.nodes]
    assert targets.count(torch.ops.aten.addmm.default) == 1  # The one with beta = 0.5 stays.
    assert targets.count(torch.ops.aten.mm.default) == 2
    for result, expected in zip(graph_module(x), layers(x)):
        torch.testing.assert_close(result, expected)
