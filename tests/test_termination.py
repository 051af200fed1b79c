"""Envs that end early: padded chunks, a loss over the valid steps only, the termination head and a
planner that weighs rewards by it; and the Control Suite, which never ends early, unchanged."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agent import cem_plan, play_episode, random_policy, rollout_returns
from conftest import TINY_FLAGS, TINY_MODEL, make_episode
from config import Config
from model import Gaussian, TransitionModel, WorldModel, features
from test_commands import run
from utils import DeviceReplayBuffer, ReplayBuffer, load_episode, preprocess_observation, save_episode
from wrappers import make_env

SHORT = "gym:tests.gym_envs:PlanetTest/Short-v0"  # Terminates at env step 3.
RECORDER = "gym:tests.gym_envs:PlanetTest/Recorder-v0"  # Terminates at 7, a time limit of 50.
FALLS = "gym:tests.gym_envs:PlanetTest/Falls-v0"  # Terminates at a step drawn at reset.


def fixed_batch(steps=6, batch=3, seed=0, states=False):
    rng = np.random.default_rng(seed)
    obs = preprocess_observation(torch.from_numpy(rng.integers(0, 256, (steps, batch, 3, 64, 64), dtype=np.uint8)),
                                 5, torch.Generator().manual_seed(1))
    actions = torch.from_numpy(rng.uniform(-1, 1, (steps, batch, 2)).astype(np.float32))
    rewards = torch.from_numpy(rng.uniform(0, 1, (steps, batch)).astype(np.float32))
    position = {"position": torch.from_numpy(rng.normal(size=(steps, batch, 3)).astype(np.float32))}
    return obs, actions, rewards, position if states else None


# --- The Control Suite: today's chunks and loss. ---

# The loss terms, gradient norm and gradient sum on `fixed_batch` with every term on. The gru
# model's were recorded with main before padding existed (bfd61ec, and again at 75ce0f0); it draws
# nothing, so they also pin that the fewer launches of issue 35 left the mathematics alone. The
# rssm's were re-recorded when the filter stopped drawing the prior samples that nothing read
# (issue 35), which changed a seed's draws; until then they were bfd61ec's too.
MAIN_LOSSES = {
    "gru": ({"image": 11812.73828125, "reward": 1.070101022720337, "kl": 0.2785281240940094,
             "kl_free": 0.17852813005447388, "state_position": 4.170553207397461, "global_kl": 0.21497564017772675,
             "overshooting_kl": 0.1790439635515213, "overshooting_reward": 1.0839142799377441,
             "total": 11828.53125}, 251.71556091308594, -278.427490234375),
    "rssm": ({"image": 11812.7490234375, "reward": 1.0696626901626587, "kl": 0.28052809834480286,
              "kl_free": 0.18052810430526733, "state_position": 4.181135654449463, "global_kl": 0.21441403031349182,
              "overshooting_kl": 0.1749989092350006, "overshooting_reward": 1.084502100944519,
              "total": 11828.544921875}, 251.72947692871094, -269.8933410644531),
}


def test_control_suite_chunks_are_those_of_main_before_padding():
    """Recorded with main at bfd61ec, before padding existed: the same chunks for a seed, exactly."""
    buffer = ReplayBuffer(chunk_length=8, capacity=10_000, seed=3)
    for i, n in enumerate([30, 12, 8, 50]):
        buffer.add(make_episode(i, n))
    index, offset = buffer.chunk_starts(6)
    assert index.tolist() == [3, 0, 0, 0, 0, 3] and offset.tolist() == [29, 6, 13, 17, 13, 28]
    obs, _, _ = buffer.sample(5)
    assert obs[0, :, 0, 0, 0].tolist() == [3, 3, 0, 0, 1] and obs[0, :, 0, 0, 1].tolist() == [34, 12, 2, 7, 1]


@pytest.mark.parametrize("variant", MAIN_LOSSES)
def test_control_suite_losses_are_those_of_main(variant):
    """The loss terms and the gradient on a fixed batch with every term on, as recorded
    (`MAIN_LOSSES`). (On the development VM they agree to the last bit; the tolerance leaves room
    for another CPU's float kernels.)"""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, model=variant, state_heads="loss", state_sizes={"position": 3})
    obs, actions, rewards, states = fixed_batch(states=True)
    torch.manual_seed(5)
    total, terms = model.loss(obs, actions, rewards, free_nats=0.1, overshooting_distance=3,
                              overshooting_reward_scale=0.5, global_kl_beta=0.1, states=states)
    total.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    main, norm, total_gradient = MAIN_LOSSES[variant]
    assert {name: float(value) for name, value in terms.items()} == pytest.approx(main, rel=1e-6)
    assert float(gradient.norm()) == pytest.approx(norm, rel=1e-5)
    assert float(gradient.sum()) == pytest.approx(total_gradient, rel=1e-5)


def test_padding_changes_no_chunk_of_long_episodes():
    """Where every episode holds a chunk, a padded buffer draws the unpadded one's chunks, all valid,
    none terminal."""
    plain, padded = ReplayBuffer(8, seed=4), ReplayBuffer(8, seed=4, pad=True)
    for i, n in enumerate([30, 12, 8, 50]):
        plain.add(make_episode(i, n))
        padded.add(make_episode(i, n))
    for _ in range(3):
        expected, ours = plain.sample(16), padded.sample(16)
        for a, b in zip(expected, ours):
            np.testing.assert_array_equal(a, b)
        terminal, valid = ours[-2:]
        assert (valid == 1).all() and (terminal == 0).all()


def test_the_control_suite_pads_nothing_and_has_no_head():
    config = Config(task="cheetah-run")
    assert not config.ends_early and not config.uses_termination_head
    gym = Config(task="gym:Hopper-v5")
    assert gym.ends_early and gym.uses_termination_head
    assert not Config(task="gym:Hopper-v5", termination_head=False).uses_termination_head


# --- Padded chunks. ---

def episode_of(episode_id, length, terminated):
    episode = make_episode(episode_id, length)
    episode["terminal"] = np.zeros(length + 1, np.float32)
    episode["terminal"][-1] = float(terminated)
    return episode


@pytest.mark.parametrize("device_replay", [False, True])
def test_short_episodes_give_one_padded_chunk_each(device_replay):
    """An episode shorter than L gives one chunk from its start, zeros past its end, its valid steps
    marked; one of n >= L steps gives n - L + 1. So episodes are drawn by the chunks they hold,
    and the device replay pads as the host replay does."""
    make = (lambda: DeviceReplayBuffer(8, seed=2, device="cpu", pad=True)) if device_replay else \
        (lambda: ReplayBuffer(8, seed=2, pad=True))
    buffer = make()
    lengths = [2, 4, 20]  # 3, 5 and 21 stored steps: 1, 1 and 14 chunks.
    for i, n in enumerate(lengths):
        buffer.add(episode_of(i, n, terminated=i < 2))
    assert buffer.chunk_count() == 16
    obs, actions, rewards, terminal, valid = [np.asarray(x) for x in buffer.sample(4000)]
    episode = obs[0, :, 0, 0, 0]
    assert np.bincount(episode, minlength=3) / 4000 == pytest.approx([1 / 16, 1 / 16, 14 / 16], abs=0.02)
    for b in np.flatnonzero(episode < 2):
        held = lengths[episode[b]] + 1
        assert valid[:, b].tolist() == [1] * held + [0] * (8 - held)
        assert terminal[:, b].tolist() == [0] * (held - 1) + [1] + [0] * (8 - held)
        assert obs[:, b, 0, 0, 1].tolist() == list(range(held)) + [0] * (8 - held)
        assert (actions[held:, b] == 0).all() and (rewards[held:, b] == 0).all()
    long = episode == 2
    assert (valid[:, long] == 1).all() and (terminal[:, long] == 0).all()  # It was truncated.
    assert set(obs[0, long, 0, 0, 1].tolist()) == set(range(14))
    if not device_replay:  # Each chunk in one episode, never two.
        steps = obs[:, :, 0, 0, 1].astype(int)
        assert ((np.diff(steps, axis=0) == 1) | (valid[1:] == 0)).all()


def test_a_time_limit_is_not_a_termination():
    """Recorder terminates at env step 7; with a limit of 5 steps it is truncated instead."""
    ended = play_episode(make_env(RECORDER, action_repeat=1, obs="state"), random_policy(2, np.random.default_rng(0)))
    assert ended["terminal"].tolist() == [0] * 7 + [1]
    cut = play_episode(make_env(RECORDER, action_repeat=1, max_episode_length=5, obs="state"),
                       random_policy(2, np.random.default_rng(0)))
    assert cut["terminal"].tolist() == [0] * 6


def test_parallel_episodes_stop_at_their_own_terminations():
    """Envs that terminate at different steps, played in parallel: each episode, its return and its
    termination flag stop where its env terminated, as the same seed played alone."""
    import contextlib

    from agent import RandomAgent, play_episodes
    from wrappers import make_parallel_envs
    seeds = [3, 11, 20, 7]
    with contextlib.closing(make_parallel_envs(FALLS, len(seeds), 1, 50, "state")) as envs:
        episodes = play_episodes(envs, RandomAgent(2, np.random.default_rng(0), len(seeds)), seeds)
    lengths = []
    for seed, episode in zip(seeds, episodes):
        env = make_env(FALLS, seed, 1, 50, "state")
        env.reset(seed=seed)
        ends_at = env._env.unwrapped.terminate_at
        lengths.append(ends_at)
        assert len(episode["reward"]) == ends_at + 1
        assert episode["reward"].sum() == sum(range(1, ends_at + 1))  # Reward t at step t.
        assert episode["terminal"].tolist() == [0] * ends_at + [1]
    assert len(set(lengths)) > 1, "the seeds should end at different steps"


# --- The loss over the valid steps. ---

@pytest.fixture
def no_sampling_noise(monkeypatch):
    """Posterior and prior samples at their means, so that a chunk gives the same states alone as in
    a batch (the noise is drawn for the whole batch at once)."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)


def padded(batch, lengths):
    """Chunks `(T, B, ...)` zeroed past `lengths[b]` steps, with their valid masks `(T, B)`."""
    padded_batch = []
    for x in batch:
        x = x.clone()
        for b, n in enumerate(lengths):
            x[n:, b] = 0
        padded_batch.append(x)
    steps = batch[0].shape[0]
    return padded_batch, torch.stack([(torch.arange(steps) < n).float() for n in lengths], 1)


@pytest.mark.parametrize("model_name", ["rssm", "gru"])
def test_masked_loss_is_the_loss_of_the_valid_steps_alone(model_name, no_sampling_noise):
    """Each chunk alone, cut to its valid steps, then the terms weighted by their steps: the padded
    batch's loss. The padding's values do not matter."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, model=model_name, state_heads="loss", state_sizes={"position": 3},
                       termination_head=True)
    obs, actions, rewards, states = fixed_batch(steps=6, batch=3, states=True)
    terminal = torch.zeros(6, 3)
    lengths = [6, 2, 4]
    terminal[1, 1] = terminal[3, 2] = 1  # Chunks 1 and 2 end where their episodes terminated.
    (obs_p, actions_p, rewards_p, position_p, terminal_p), valid = padded(
        [obs, actions, rewards, states["position"], terminal], lengths)
    obs_p[2:, 1] = 7.0  # Garbage past the end.
    settings = {"free_nats": 0.05, "global_kl_beta": 0.1}
    _, ours = model.loss(obs_p, actions_p, rewards_p, states={"position": position_p}, terminal=terminal_p,
                         valid=valid, **settings)
    alone = [model.loss(obs[:n, b:b + 1], actions[:n, b:b + 1], rewards[:n, b:b + 1],
                        states={"position": states["position"][:n, b:b + 1]}, terminal=terminal[:n, b:b + 1],
                        **settings)[1] for b, n in enumerate(lengths)]
    for name in ("image", "reward", "kl", "kl_free", "state_position", "global_kl", "continue"):
        expected = sum(n * terms[name] for n, terms in zip(lengths, alone)) / sum(lengths)
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_masked_overshooting_is_that_of_the_valid_steps_alone(no_sampling_noise):
    """Chunks padded past the same number of valid steps: overshooting (KL and reward) is that of
    the batch cut to them, every d averaged over its valid pairs only."""
    torch.manual_seed(1)
    model = WorldModel(2, **TINY_MODEL)
    obs, actions, rewards, _ = fixed_batch(steps=7, batch=3, seed=2)
    (obs_p, actions_p, rewards_p), valid = padded([obs, actions, rewards], [4, 4, 4])
    settings = {"free_nats": 0.01, "overshooting_distance": 3, "overshooting_reward_scale": 1.0}
    _, ours = model.loss(obs_p, actions_p, rewards_p, valid=valid, **settings)
    _, cut = model.loss(obs[:4], actions[:4], rewards[:4], **settings)
    for name in ("overshooting_kl", "overshooting_reward", "kl", "image"):
        torch.testing.assert_close(ours[name], cut[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_termination_head_loss_by_hand():
    """-log Bernoulli(running | sigmoid(logit)) over the valid steps, weighted by --continue-scale."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, termination_head=True)
    obs, actions, rewards, _ = fixed_batch(steps=5, batch=2)
    terminal, valid = torch.zeros(5, 2), torch.ones(5, 2)
    terminal[2, 1], valid[3:, 1] = 1, 0
    torch.manual_seed(3)
    total, terms = model.loss(obs, actions, rewards, terminal=terminal, valid=valid, continue_scale=10.0)
    torch.manual_seed(3)
    _, without = model.loss(obs, actions, rewards, terminal=terminal, valid=valid, continue_scale=0.0)
    torch.manual_seed(3)
    belief, state = model.rssm.initial(2, "cpu")
    beliefs, _, posteriors = model.rssm.observe(model.encoder(obs), actions, belief, state)
    logits = model.continue_model(features(beliefs, posteriors.sample))
    p = torch.sigmoid(logits)
    running = 1 - terminal
    nll = -(running * p.log() + (1 - running) * (1 - p).log())
    expected = (nll * valid).sum() / valid.sum()
    torch.testing.assert_close(terms["continue"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total - without["total"], 10 * expected, rtol=1e-4, atol=1e-3)


# --- The planner. ---

class Toy(TransitionModel):
    """A world model whose state is the last action: the reward is 2 + a / 2 at every step, and the
    episode ends after any step whose action is above -1/2 (a robot that reaches and falls)."""

    action_size, belief_size, state_size = 1, 1, 1
    mean_only = True  # Its sample is the action itself: it draws no noise.

    def img_step(self, state, action, belief, noise=None):
        return belief, Gaussian(action, torch.ones_like(action), action)

    def reward(self, feature):  # The features are [s, h]: the action comes first.
        return 2 + feature[..., 0] / 2

    def still_running(self, feature):
        return 50 * (-0.5 - feature[..., 0])  # The logit: still running (1) after a < -1/2, else 0.


@pytest.mark.parametrize("stacked", [False, True])
def test_cem_with_the_head_prefers_the_plan_that_does_not_fall(stacked):
    """Without the head, falling pays most (2.5 a step at a = 1); with it, a falling plan gets one
    step's reward, a standing one (a = -1: 1.5 a step) all of them, and CEM stands (a < -1/2)."""
    toy = Toy()
    belief, state = torch.zeros(1, 1), torch.zeros(1, 1)
    rollout = lambda *args, **kwargs: rollout_returns(*args, **kwargs, stacked=stacked)
    settings = {"horizon": 5, "iterations": 6, "candidates": 400, "top_candidates": 40, "rollout": rollout}
    torch.manual_seed(0)
    greedy = cem_plan(toy, toy.reward, belief, state, **settings)
    torch.manual_seed(0)
    careful = cem_plan(toy, toy.reward, belief, state, **settings, continue_model=toy.still_running)
    assert greedy.item() > 0.9 and careful.item() < -0.5
    actions = torch.tensor([1.0, -1.0]).expand(5, 2)[..., None]  # (T, N=2, A): falls, stands.
    returns = rollout_returns(toy, toy.reward, actions, torch.zeros(2, 1), torch.zeros(2, 1),
                              continue_model=toy.still_running, stacked=stacked)
    torch.testing.assert_close(returns, torch.tensor([2.5, 7.5]), atol=1e-4, rtol=0)


# --- End to end. ---

def flags(task, chunk="50"):
    given = TINY_FLAGS.copy()
    given[given.index("--task") + 1] = task
    given[given.index("--chunk-length") + 1] = chunk
    given[given.index("--episodes") + 1] = "3"
    return given + ["--obs", "state"]


def test_a_run_written_before_terminations_were_stored_resumes_as_before(tmp_path):
    """A gym run without a termination head, its config.json without the setting and its episodes
    without terminations (as written before this change): it resumes, pads, and tests."""
    run_dir = tmp_path / "run"
    run("train.py", *flags(SHORT), "--no-termination-head", "--run-dir", str(run_dir))
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["termination_head"], saved["continue_scale"]
    (run_dir / "config.json").write_text(json.dumps(saved))
    for path in (run_dir / "episodes" / "train").glob("*.npz"):
        episode = load_episode(path)
        del episode["terminal"]
        path.unlink()
        save_episode(path.parent, int(path.name.split("-")[0]), episode)
    run("train.py", "--resume", str(run_dir), "--episodes", "4")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["episodes"] == 4 and records[-1]["updates"] == 6 and "loss/continue" not in records[-1]
    assert "mean return" in run("test.py", str(run_dir), "--episodes", "2", "--device", "cpu").stdout


def test_a_run_that_cannot_train_says_why_and_stops(tmp_path, monkeypatch):
    """Unpadded chunks (as the Control Suite's) of an env whose episodes all end before L: one
    message with the fix and a non-zero exit, not episodes collected forever."""
    import train
    monkeypatch.setattr(Config, "ends_early", property(lambda self: False))
    with pytest.raises(SystemExit) as stop:
        train.main(flags(SHORT, chunk="8") + ["--run-dir", str(tmp_path / "run")])
    assert "holds a chunk of 8 steps (the longest has 3)" in str(stop.value)
    assert "--chunk-length 3 or less" in str(stop.value)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # The seed episodes, then it stopped.
