"""Learning regression test: the world model learns an easy task from random episodes, and the
agent plans with it.

The real pipeline at small sizes: dm_control episodes with real rendering, the replay buffer and
its prefetcher, `train.update` (the loss, Adam, warm-up, clipping), `open_loop_errors` (the
diagnostics that train.py logs at each test), then the agent (`Agent`, `planner_policy`,
`play_episode`) planning with the paper's CEM. About 12 minutes of CPU: this is the test that fails
when the agent is broken in ways that shapes and unit tests cannot see.

`python tests/test_learning.py [THREADS]` prints the measurements the thresholds come from.
"""
import sys

import numpy as np
import torch

import conftest  # noqa: F401  Puts the repository on sys.path when this file runs as a script.
from agent import Agent, play_episode, planner_policy, random_policy
from config import Config
from diagnostics import open_loop_errors
from runs import build_model
from train import update
from utils import BatchPrefetcher, ReplayBuffer, preprocess_observation, set_seed_everywhere
from wrappers import make_env

TASK = "cartpole-balance"
# Free nats 0, not the paper's 3: with 3, this model's KL stays under 3 nats for all 1000 updates
# (measured: 2.78 at the end), so the KL has no gradient, the prior does not train and neither the
# direction of the KL nor the open-loop predictions can be checked.
CONFIG = Config(task=TASK, action_repeat=8, max_episode_length=400,  # 50 decisions per episode.
                batch_size=16, chunk_length=25, collect_interval=1000, free_nats=0.0,
                belief_size=64, state_size=16, hidden_size=64, reward_hidden_size=64, cnn_depth=8).for_device("cpu")
TRAIN_EPISODES, HELD_OUT_EPISODES = 16, 4
PLANNER = {"horizon": 12, "iterations": 10, "candidates": 1000, "top_candidates": 100}  # The paper's.
PLANNED_EPISODES = 4


def collect_random(count, seed):
    env = make_env(TASK, seed, CONFIG.action_repeat, CONFIG.max_episode_length)
    policy = random_policy(env.action_size, np.random.default_rng(seed))
    return [play_episode(env, policy) for _ in range(count)]


@torch.no_grad()
def std_ratio(model, episodes):
    """Mean std of the posteriors over that of the priors, on the filtered steps after the first."""
    posterior_std, prior_std = 0.0, 0.0
    for episode in episodes:
        obs = preprocess_observation(torch.as_tensor(episode["obs"][:, None]), CONFIG.bit_depth)
        actions = torch.as_tensor(episode["action"][:, None])
        _, priors, posteriors = model.rssm.observe(model.encoder(obs), actions, *model.rssm.initial(1, "cpu"))
        posterior_std += posteriors.std[1:].mean().item()
        prior_std += priors.std[1:].mean().item()
    return posterior_std / prior_std


def planner_episodes(model, count, seed, action_noise=0.0):
    """`count` episodes played by the agent, and for each, at each step, torch's random state
    before the agent observed and the agent's (belief, state) after it, as the planner saw them."""
    env = make_env(TASK, seed, CONFIG.action_repeat, CONFIG.max_episode_length)
    agent = Agent(model, PLANNER, CONFIG.bit_depth)
    episodes, traces = [], []
    for _ in range(count):
        plan, trace = planner_policy(agent, action_noise), []

        def policy(obs, previous_action):
            random_state = torch.get_rng_state()
            action = plan(obs, previous_action)
            trace.append((random_state, agent.belief, agent.state))
            return action

        episodes.append(play_episode(env, policy))
        traces.append(trace)
    return episodes, traces


@torch.no_grad()
def filter_error(model, episode, trace):
    """The largest difference between the agent's belief and posterior state after each
    observation and the RSSM's posterior step, redone from the agent's previous belief and state
    with the stored frame and the stored action that led to it, the executed one (noise and
    clipping included). With torch's random state restored, the frame's dequantisation noise and
    the samples are the agent's, so the two agree to float rounding when the agent filters what it
    saw with what it did."""
    belief, state = model.rssm.initial(1, "cpu")
    worst = 0.0
    for t, (random_state, agent_belief, agent_state) in enumerate(trace):
        torch.set_rng_state(random_state)
        obs = preprocess_observation(torch.as_tensor(episode["obs"][t:t + 1]), CONFIG.bit_depth)
        expected_belief, _, posterior = model.rssm.obs_step(
            state, torch.as_tensor(episode["action"][t:t + 1]), belief, model.encoder(obs))
        worst = max(worst, (expected_belief - agent_belief).abs().max().item(),
                    (posterior.sample - agent_state).abs().max().item())
        belief, state = agent_belief, agent_state
    return worst


def learn(seed=0):
    """Fit the world model on random episodes, measure it on held-out ones. -> a dict."""
    set_seed_everywhere(seed)
    train, held_out = collect_random(TRAIN_EPISODES, seed), collect_random(HELD_OUT_EPISODES, seed + 1)
    env = make_env(TASK)
    model = build_model(CONFIG, env).eval()
    env.close()
    untrained = open_loop_errors(model, held_out, CONFIG.horizon, bit_depth=CONFIG.bit_depth)
    buffer = ReplayBuffer(CONFIG.chunk_length, seed=seed)
    for episode in train:
        buffer.add(episode)
    optimizer = torch.optim.Adam(model.parameters(), lr=CONFIG.learning_rate, eps=CONFIG.adam_epsilon)
    batches = BatchPrefetcher(buffer, CONFIG.batch_size, CONFIG.collect_interval, "cpu", CONFIG.bit_depth,
                              torch.Generator().manual_seed(seed))
    model.train()
    for step, batch in enumerate(batches):
        update(model, optimizer, batch, CONFIG, step)
    model.eval()
    trained = open_loop_errors(model, held_out, CONFIG.horizon, bit_depth=CONFIG.bit_depth)
    # The planner, noise-free as in a test, against random actions from the same initial states;
    # then one episode with exploration noise, as when collecting, for the belief check.
    torch.manual_seed(seed)
    planned, traces = planner_episodes(model, PLANNED_EPISODES, seed + 2)
    random = collect_random(PLANNED_EPISODES, seed + 2)
    noisy, noisy_traces = planner_episodes(model, 1, seed + 3, action_noise=CONFIG.action_noise)
    return {"untrained": untrained, "trained": trained, "std_ratio": std_ratio(model, held_out),
            "planner_return": float(np.mean([episode["reward"].sum() for episode in planned])),
            "random_return": float(np.mean([episode["reward"].sum() for episode in random])),
            "filter_error": max(filter_error(model, episode, trace) for episode, trace
                                in zip(planned + noisy, traces + noisy_traces))}


def test_the_world_model_learns_from_random_episodes():
    """Margins measured with the code as it is and with bugs put in on purpose (1000 updates; runs
    differ by float rounding, e.g. with 1 or 2 threads or a busy machine, which training grows):
    - reward explained on held-out episodes, 1 - posterior MSE / variance: 0.79, 0.75, 0.79. With
      the reward target shifted by one step (the model at t fits r_{t+1}): 0.65. Threshold 0.70.
    - open-loop (12 steps) reward MSE / variance: 0.63, 0.80, 0.61. Threshold 0.9: the prior predicts.
    - open-loop image MSE / untrained model's: 0.042, 0.042, 0.043. Threshold 0.1.
    - open-loop image MSE / the mean frame's (always predicting the mean of the target frames):
      1.16, and 1.05 one step ahead; the posterior's reconstructions 1.02. At this budget the
      decoder has learnt the background, not the cart and pole (the image loss ends 11 nats above
      its constant), which the reward and the belief carry instead. Threshold 1.3: it sees a
      decoder that has not even learnt the background (untrained: 27), not one that stops at it.
    - posterior std / prior std: 0.952, 0.952, 0.971. With KL(prior || posterior): 0.994, 0.999,
      since that direction pulls the posterior wide. Threshold 0.983.
    - the paper's CEM with this model, 4 noise-free episodes: 196.2 against 140.3 for random
      actions from the same initial states. Threshold: above random. (With the agent's belief fed
      zeros, or the action before the executed one, it still scores 192.8 and 186.0: returns at
      this budget cannot see that bug, so the next check does.)
    - the agent's belief and posterior state against the posterior step redone from its previous
      ones with the stored frame and executed action, torch's random state restored: 0.0 (the
      same ops on the same numbers). Bugs put into the agent, on the belief alone, measured on the
      model of one learn() with a quick planner (J 100, I 2), noise-free / with exploration noise:
      zeros for the action 0.08 / 0.14; the action before the executed one 0.10 / 0.17; the
      noise-free plan instead of the noisy executed action 0.0 / 0.12, which is why one episode
      plays with noise. On an untrained model, which the belief alone cannot see: the previous
      frame instead of the new one 0.0011, a frame not preprocessed 3.2, the prior's sample kept
      instead of the posterior's 3.3. Threshold 1e-4.
    """
    result = learn()
    trained, untrained = result["trained"], result["untrained"]
    variance = trained["reward_mse_constant"]
    assert 1 - trained["reward_mse_posterior"] / variance > 0.70, result
    assert trained["reward_mse_open_loop"] / variance < 0.9, result
    assert trained["image_mse_open_loop"] / untrained["image_mse_open_loop"] < 0.1, result
    assert trained["image_mse_open_loop"] / trained["image_mse_constant"] < 1.3, result
    assert result["std_ratio"] < 0.983, result
    assert result["planner_return"] > result["random_return"], result
    assert result["filter_error"] < 1e-4, result


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    for name, value in learn().items():
        print(name, value)
