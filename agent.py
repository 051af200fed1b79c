"""Planning in latent space with the cross-entropy method (PlaNet Sec. 2, Algorithm 2; official
`control/planning.py`), and the agent that filters observations and acts with it."""
import functools

import numpy as np
import torch

from capture import CUDAGraphed
from model import cpu_order, features
from utils import preprocess_observation


def rollout_returns(rssm, reward_model, actions, belief, state, discount=1.0, stacked=None, continue_model=None):
    """Predicted return of open-loop rollouts with prior samples: actions `(T, N, A)` from beliefs
    `(N, H)` and states `(N, S)` -> the sum of the reward model's means over the T steps, `(N,)`,
    the step k (from 0) weighted by `discount ** k`: 1 (HEAD, undiscounted) or 0.99 (camera-ready
    `0c6f7d3`, `control/planning.py:28,51-52`).

    Two orders of the same sum; `stacked` picks one (None: `model.cpu_order`). On a CPU rewards are added
    step by step: `(N, 300)` activations stay in cache, and its matmuls run twice as fast as on
    the `(T * N, 300)` stack. On a GPU every op is a kernel launch, and the launches are the cost:
    there the reward model runs once on the T steps' stacked features, 7 launches instead of 7 T.

    With a `continue_model` (`--termination-head`, for envs that end early) the reward of step k
    is also weighted by the predicted probability that the episode still ran before it, the
    product of the continue probabilities of steps 0..k-1, as Dreamer weighs imagined rewards
    (danijar/dreamer 399cad5, `dreamer.py` `_train`): a plan that falls gains nothing after.
    """
    if stacked is None:
        stacked = not cpu_order(actions.device)
    if not stacked:
        returns = torch.zeros(actions.shape[1], device=actions.device)
        running = torch.ones_like(returns) if continue_model is not None else None
        noise = rssm.prior_noise(actions)  # Drawn as `imagine` draws it, so both orders see one noise.
        for step, action in enumerate(actions.unbind(0)):
            belief, prior = rssm.img_step(state, action, belief, None if noise is None else noise[step])
            state = prior.sample
            feature = features(belief, state)
            reward = discount ** step * reward_model(feature)
            if running is None:
                returns += reward
            else:
                returns += running * reward
                running = running * torch.sigmoid(continue_model(feature))
        return returns
    beliefs, states = rssm.imagine(actions, belief, state)
    feature = features(beliefs, states)  # (T, N, F)
    rewards = reward_model(feature)  # (T, N)
    if discount != 1:
        rewards = rewards * discount ** torch.arange(len(actions), device=actions.device)[:, None]
    if continue_model is not None:
        still = torch.sigmoid(continue_model(feature[:-1])).cumprod(0)  # Step k's: running before k + 1.
        rewards = torch.cat([rewards[:1], rewards[1:] * still])
    return rewards.sum(0)


@functools.cache
def compiled_rollout_returns():
    """`rollout_returns` through `torch.compile`, which fuses the elementwise ops of each step.
    It compiles at the first call for each batch shape (about a minute on a CPU). Random draws
    stay eager PyTorch's (`fallback_random`), so a seed gives the plan of the uncompiled rollout."""
    from inductor_pass import BiasAfterMatmul  # Here, not at the top: torch._inductor is slow to import.
    return torch.compile(rollout_returns, dynamic=False, options={
        "fallback_random": True, "post_grad_custom_post_pass": BiasAfterMatmul()})


@torch.no_grad()
def cem_plan(rssm, reward_model, belief, state, horizon=12, iterations=10, candidates=1000,
             top_candidates=100, discount=1.0, rollout=rollout_returns, continue_model=None):
    """Plan from the beliefs `(B, H)` and state samples `(B, S)` of B independent agents.

    Every candidate of an agent starts from that agent's one state sample. The belief over action
    sequences starts at N(0, I) `(horizon, B, 1, A)`; each iteration samples `candidates` sequences,
    clips them to [-1, 1], rolls them out with the prior (sampled states), scores each by the sum
    of predicted rewards over the horizon (discounted by `discount`), and refits mean and
    population std to the best `top_candidates`. All candidates of all agents are one batch: no
    Python loop over candidates and no host sync. `rollout` may be a compiled `rollout_returns`;
    a `continue_model` weighs its rewards by the predicted chance that the episode still runs.
    Returns the first action of the final mean, `(B, A)`.
    """
    batch, action_size = belief.shape[0], rssm.action_size
    heads = {} if continue_model is None else {"continue_model": continue_model}
    belief = belief.repeat_interleave(candidates, dim=0)  # (B * J, H), agent-major.
    state = state.repeat_interleave(candidates, dim=0)
    mean = torch.zeros(horizon, batch, 1, action_size, device=belief.device)
    std = torch.ones_like(mean)
    for _ in range(iterations):
        noise = torch.randn(horizon, batch, candidates, action_size, device=belief.device)
        actions = torch.addcmul(mean, std, noise).clamp(-1, 1)
        returns = rollout(rssm, reward_model, actions.reshape(horizon, batch * candidates, action_size),
                          belief, state, discount, **heads).reshape(batch, candidates)
        top = returns.topk(top_candidates, dim=1).indices  # (B, K)
        best = actions.gather(2, top[None, :, :, None].expand(horizon, -1, -1, action_size))
        var, mean = torch.var_mean(best, 2, correction=0, keepdim=True)
        std = (var + 1e-6).sqrt()
    return mean[0, :, 0]


@functools.cache
def captured_cem_plan(device_type, compile_rollout=False):
    """`cem_plan` for `--capture-planner`. On CUDA: the whole call, I x H rollout steps and the
    refits, captured from eager PyTorch as one CUDA graph per batch shape (`capture.CUDAGraphed`),
    so that a call launches one graph instead of some 3,000 small kernels; with `compile_rollout`
    (`--compile-planner`) its rollout compiled inside the graph (`compiled_rollout_returns`). The
    graph replays eager's kernels and draws eager's noise, so a seed gives the eager plan.
    On a CPU, which has no graphs to capture: the whole call through `torch.compile`, its random
    draws eager PyTorch's (`fallback_random`), a seed giving the eager plan up to float rounding;
    it compiles at the first call for each batch shape."""
    if device_type == "cuda":
        graphed = CUDAGraphed(cem_plan)
        if not compile_rollout:
            return graphed
        return lambda *args, **kwargs: graphed(*args, **{**kwargs, "rollout": compiled_rollout_returns()})
    from inductor_pass import BiasAfterMatmul
    return torch.compile(cem_plan, dynamic=False, options={
        "fallback_random": True, "post_grad_custom_post_pass": BiasAfterMatmul()})


class Agent:
    """Keeps the filtered belief of B environments and plans their next actions.

    Call `observe(obs, action)` with each new observation and the action that was actually
    executed to reach it (zeros at reset), then `act()`.
    """

    def __init__(self, model, planner_config, bit_depth=5, batch_size=1, plan=cem_plan):
        self.model = model
        self.config = planner_config
        self.plan = plan  # cem_plan, or the same function compiled (`captured_cem_plan`).
        self.bit_depth = bit_depth
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.reset()

    def reset(self):
        self.belief, self.state = self.model.rssm.initial(self.batch_size, self.device)

    @torch.no_grad()
    def observe(self, obs, action):
        """obs uint8 `(B, 3, 64, 64)` (or float `(B, obs_size)` from states), action `(B, A)`: the
        posterior step of the filter."""
        obs = preprocess_observation(torch.as_tensor(obs, device=self.device), self.bit_depth)
        action = torch.as_tensor(action, dtype=torch.float32, device=self.device)
        self.belief, _, posterior = self.model.rssm.obs_step(
            self.state, action, self.belief, self.model.encoder(obs))
        self.state = posterior.sample

    def act(self, action_noise=0.0):
        """Plan `(B, A)` actions, add N(0, action_noise^2) exploration noise, clip to [-1, 1]."""
        action = self.plan(self.model.rssm, self.model.reward_model, self.belief, self.state,
                           **self.config, continue_model=self.model.continue_model)
        if action_noise > 0:
            action = action + action_noise * torch.randn_like(action)
        return action.clamp(-1, 1).cpu().numpy()


STATE_PREFIX = "state_"  # Episode keys of the proprioceptive observation, e.g. `state_position`.


def _record(episode, obs, action, reward, info, terminal=False):
    """Append one step to `episode` (lists by key): the observation, the action that led to it, its
    reward, whether the env terminated there (a time limit's truncation is not a termination),
    the env's proprioceptive state (`info["state"]`, `{}` when the env has none) and, from
    states with frames, the frame rendered beside it (`info["frame"]`)."""
    steps = {"obs": obs, "action": action, "reward": reward, "terminal": float(terminal),
             **{STATE_PREFIX + key: value for key, value in info.get("state", {}).items()},
             **({"frame": info["frame"]} if "frame" in info else {})}
    for key, value in steps.items():
        episode.setdefault(key, []).append(value)


def _as_arrays(episode):
    return {key: np.array(value, np.float32) if key in ("reward", "terminal") else np.stack(value)
            for key, value in episode.items()}


def episode_frames(episode):
    """An episode's `(T, 3, 64, 64)` uint8 images: its observations from pixels, else the frames
    rendered beside its states, or None when its env was not asked for them."""
    if "frame" in episode:
        return episode["frame"]
    return episode["obs"] if episode["obs"].dtype == np.uint8 else None


def play_episode(env, policy, on_frame=None):
    """Run one episode. `policy(obs, previous_action) -> action` sees the newest observation and the
    executed action that led to it. Returns the episode as arrays of length T + 1 with
    `action[t]` the action that led to `obs[t]`, `reward[t]` its reward (zeros at reset),
    `terminal[t]` 1 where the env terminated (never where a time limit ended it), the
    proprioceptive state of each step as `state_<key>` (which the policy does not see), and
    from states with frames, the frames as `frame`. `on_frame` sees each observation, or the frame
    beside it."""
    obs, info = env.reset()
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    episode = {}
    _record(episode, obs, action, 0.0, info)
    done = False
    while not done:
        if on_frame is not None:
            on_frame(info.get("frame", obs))
        action = np.clip(policy(obs, action), -1, 1).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        _record(episode, obs, action, reward, info, terminated)
    if on_frame is not None:
        on_frame(info.get("frame", obs))
    return _as_arrays(episode)


def planner_policy(agent, action_noise=0.0):
    """A single-env `policy` for `play_episode` that filters with the executed action, then plans."""
    agent.reset()

    def policy(obs, previous_action):
        agent.observe(obs[None], previous_action[None])
        return agent.act(action_noise)[0]

    return policy


def play_episodes(envs, agent, seeds, on_frames=None):
    """One noise-free planner episode in each of N parallel envs, seeded with `seeds`: the agent
    (batch size N) plans for all N in one batched call per step. Returns N episodes as
    `play_episode` does; an env that finishes first keeps stepping, and its extra steps are dropped.
    `on_frames` sees every `(N, 3, 64, 64)` observation, or from states the frames beside them."""
    obs, info = envs.reset(seed=list(seeds))
    action = np.zeros(envs.action_space.shape, dtype=np.float32)
    reward = np.zeros(len(obs), dtype=np.float32)
    episodes = [{} for _ in obs]

    def record(i, terminal=False):
        # A vector env's info holds each key for all envs, and a mask `_key` of those that set it.
        state = {key: value[i] for key, value in info.get("state", {}).items() if not key.startswith("_")}
        _record(episodes[i], obs[i], action[i], reward[i],
                {"state": state, **({"frame": info["frame"][i]} if "frame" in info else {})}, terminal)

    def frames():
        return np.stack(info["frame"]) if "frame" in info else obs

    for i in range(len(episodes)):
        record(i)
    running = np.ones(len(episodes), dtype=bool)
    agent.reset()
    while running.any():
        if on_frames is not None:
            on_frames(frames())
        agent.observe(obs, action)
        action = agent.act()
        obs, reward, terminated, truncated, info = envs.step(action)
        for i in np.flatnonzero(running):
            record(i, terminated[i])
        running &= ~(terminated | truncated)
    if on_frames is not None:
        on_frames(frames())
    return [_as_arrays(episode) for episode in episodes]


class RandomAgent:
    """Uniform random actions in [-1, 1] for B envs, with the interface of `Agent`: the level that a
    trained planner must beat, played on the same episodes by `play_episodes`."""

    def __init__(self, action_size, rng, batch_size=1):
        self.action_size, self.rng, self.batch_size = action_size, rng, batch_size

    def reset(self):
        pass

    def observe(self, obs, action):
        pass

    def act(self, action_noise=0.0):
        return self.rng.uniform(-1, 1, (self.batch_size, self.action_size)).astype(np.float32)


def random_policy(action_size, rng):
    """Uniform random actions in [-1, 1], for the seed episodes."""
    return lambda obs, previous_action: rng.uniform(-1, 1, action_size).astype(np.float32)
