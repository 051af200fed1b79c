"""Gymnasium envs from pixels (`--task gym:ID`): real envs with real rendering, and tiny registered
ones (tests/gym_envs.py) where a test must see what the env was given."""
import io
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agent import play_episode
from conftest import TINY_FLAGS, make_episode
from test_commands import run
from utils import ReplayBuffer, pack_random_state, unpack_random_state
from wrappers import GYM_ACTION_REPEAT, check_task, default_action_repeat, make_env, parse_task

RECORDER = "gym:tests.gym_envs:PlanetTest/Recorder-v0"


def test_actions_are_scaled_to_the_env_bounds_after_clipping():
    env = make_env(RECORDER, action_repeat=1)
    obs, info = env.reset()
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8
    assert env.action_space.low.tolist() == [-1, -1] and env.action_space.high.tolist() == [1, 1]
    for action in ([-1, 1], [0, 0], [0.5, -0.5], [5, -5]):
        env.step(np.array(action, np.float32))
    np.testing.assert_allclose(env._env.unwrapped.actions, [[-2, 10], [-0.75, 5], [-0.125, 2.5], [0.5, 0]],
                               rtol=1e-6)


def test_action_repeat_sums_rewards_and_stops_at_termination_or_the_length_limit():
    """The Recorder's rewards are 1, 2, ... and it terminates at env step 7; frames show step 10 t."""
    env = make_env(RECORDER, action_repeat=3)
    env.reset()
    results = [env.step(np.zeros(2)) for _ in range(3)]
    assert [r[1] for r in results] == [1 + 2 + 3, 4 + 5 + 6, 7]
    assert [(r[2], r[3]) for r in results] == [(False, False), (False, False), (True, False)]
    assert [r[4]["env_steps"] for r in results] == [3, 6, 7]
    assert results[-1][0].min() == results[-1][0].max() == 70  # Rendered after the last step.
    np.testing.assert_array_equal(results[-1][4]["state"]["observation"][:1], [7])
    env = make_env(RECORDER, action_repeat=3, max_episode_length=5)
    env.reset()
    assert [env.step(np.zeros(2))[1:4] for _ in range(2)] == [(6, False, False), (4 + 5, False, True)]


def test_pendulum_default_repeat_own_time_limit_state_and_seeds():
    """Pendulum-v1 ends by its own TimeLimit (200 steps): 100 decisions of the default repeat 2.
    A seed gives the same episodes twice; `info["state"]` is Gymnasium's own observation."""
    assert default_action_repeat("gym:Pendulum-v1") == GYM_ACTION_REPEAT == 2
    assert parse_task("gym:Pendulum-v1") == ("gym", "Pendulum-v1")
    first, second = make_env("gym:Pendulum-v1", seed=11), make_env("gym:Pendulum-v1", seed=11)
    assert first.state_sizes == {"observation": 3} and first.action_size == 1
    reference = gym.make("Pendulum-v1")
    starts = [first.reset(), first.reset()]
    np.testing.assert_array_equal(starts[0][1]["state"]["observation"], reference.reset(seed=11)[0])
    for obs, info in starts:
        obs2, info2 = second.reset()
        np.testing.assert_array_equal(obs2, obs)
        np.testing.assert_array_equal(info2["state"]["observation"], info["state"]["observation"])
    assert not np.array_equal(starts[0][0], starts[1][0])
    np.testing.assert_array_equal(first.reset(seed=11)[0], starts[0][0])
    assert not np.array_equal(make_env("gym:Pendulum-v1", seed=12).reset()[0], starts[0][0])
    decisions, done = 0, False
    while not done:
        _, _, terminated, truncated, info = first.step(np.array([1.0], np.float32))
        decisions, done = decisions + 1, terminated or truncated
    assert (decisions, info["env_steps"], terminated, truncated) == (100, 200, False, True)
    first.close(), second.close()


def test_rng_state_round_trip_through_a_checkpoint():
    """A fresh env given a saved generator state plays the episode that the saving env plays next."""
    env = make_env("gym:Pendulum-v1", seed=5)
    env.reset()
    data = io.BytesIO()
    torch.save({"env": pack_random_state(env.get_rng_state())}, data)
    data.seek(0)
    state = unpack_random_state(torch.load(data, weights_only=True)["env"])
    following = env.reset()[0]
    restored = make_env("gym:Pendulum-v1", seed=99)
    restored.set_rng_state(state)
    np.testing.assert_array_equal(restored.reset()[0], following)
    # Before the first reset: the state that its seed will give.
    fresh = make_env("gym:Pendulum-v1", seed=99)
    fresh.set_rng_state(make_env("gym:Pendulum-v1", seed=5).get_rng_state())
    np.testing.assert_array_equal(fresh.reset()[0], make_env("gym:Pendulum-v1", seed=5).reset()[0])


def test_hopper_terminates_early_when_it_falls():
    """A constant extreme action throws Hopper over: the episode ends there, terminated, with its
    true length, and its states are those of Gymnasium's Hopper given the same actions and seed."""
    env = make_env("gym:Hopper-v5", seed=0, action_repeat=2)
    assert env.state_sizes == {"observation": 11} and env.action_size == 3
    episode = play_episode(env, lambda obs, previous_action: np.ones(3, np.float32))
    steps = env.steps
    assert 2 < steps < 100 and len(episode["reward"]) == (steps + 1) // 2 + 1
    reference = gym.make("Hopper-v5")
    states = [reference.reset(seed=0)[0]]
    for step in range(steps):
        observation, _, terminated, _, _ = reference.step(np.ones(3, np.float32))
        if step % 2 or step == steps - 1:
            states.append(observation)
    assert terminated
    np.testing.assert_allclose(episode["state_observation"], np.array(states, np.float32), rtol=1e-6)
    assert episode["obs"].shape == (len(states), 3, 64, 64)
    env.close()


def test_an_episode_shorter_than_a_chunk_has_no_chunk_starts():
    buffer = ReplayBuffer(chunk_length=8, seed=0)
    buffer.add(make_episode(1, 4))  # 5 steps: no chunk of 8.
    assert buffer.chunk_count() == 0
    with pytest.raises(ValueError, match="no episode holds a chunk of 8 steps"):
        buffer.sample(2)
    buffer.add(make_episode(2, 9))  # 10 steps: 3 chunks.
    buffer.add(make_episode(3, 2))
    assert buffer.chunk_count() == 3
    obs, actions, rewards = buffer.sample(64)
    assert set(obs[0, :, 0, 0, 0].tolist()) == {2}  # Every chunk from the one long episode.


@pytest.mark.parametrize("task, obs, message", [
    ("gym:CartPole-v1", "state", "action space is Discrete(2); PlaNet needs a bounded continuous action space"),
    ("gym:Pendelum-v1", "pixels", "unknown Gymnasium env gym:Pendelum-v1 (Environment `Pendelum` doesn't exist"),
    ("gym:tests.gym_envs:PlanetTest/NoRender-v0", "pixels", "cannot render rgb_array pixels"),
    ("gym:tests.gym_envs:PlanetTest/HumanOnly-v0", "pixels", "its render modes are ['human']; learning from pixels"),
    ("gym:tests.gym_envs:PlanetTest/ImageObservation-v0", "state",
     "its observation space is Box(0, 255, (8, 8, 3), uint8); --obs state needs a flat Box"),
    ("cartpole-swingup", "vectors", "unknown observation 'vectors'; known: pixels, state"),
])
def test_clear_errors(task, obs, message):
    with pytest.raises(ValueError) as error:
        check_task(task, obs)
    assert message in str(error.value) and "\n" not in str(error.value)


def gym_flags(task, max_episode_length):
    flags = TINY_FLAGS.copy()
    flags[flags.index("--task") + 1] = task
    flags[flags.index("--max-episode-length") + 1] = str(max_episode_length)
    return flags


@pytest.mark.parametrize("task, length, chunk", [("gym:Pendulum-v1", 40, 8), ("gym:Hopper-v5", 40, 8),
                                                 ("gym:tests.gym_envs:PlanetTest/Short-v0", 200, 50)])
def test_commands_end_to_end(tmp_path, task, length, chunk):
    """train.py, --resume, test.py and video_prediction.py on a gym task. Short-v0 terminates at env
    step 3, long before a chunk of the default 50 steps ends: its padded chunks train the model
    and its termination head all the same."""
    run_dir = tmp_path / "run"
    flags = gym_flags(task, length)
    flags[flags.index("--episodes") + 1] = "3"
    flags[flags.index("--chunk-length") + 1] = str(chunk)
    run("train.py", *flags, "--run-dir", str(run_dir))
    run("train.py", "--resume", str(run_dir), "--episodes", "4")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["updates"] == 6 and "test/return" in records[-1]
    assert json.loads((run_dir / "config.json").read_text())["termination_head"] is True
    assert np.isfinite(records[-1]["loss/continue"])
    out = run("test.py", str(run_dir), "--episodes", "2", "--device", "cpu").stdout
    assert "mean return" in out
    video = run("video_prediction.py", str(run_dir), "--context", "2", "--length", "3", "--device", "cpu").stdout
    assert Path(video.strip()).is_file()


def test_train_rejects_a_discrete_gym_env_as_a_usage_error():
    result = run("train.py", "--task", "gym:CartPole-v1", check=False)
    assert result.returncode == 2 and "Discrete(2)" in result.stderr and "Traceback" not in result.stderr
