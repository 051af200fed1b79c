"""The dm_control env from pixels: action repeat, time limit, task names."""
import subprocess
import sys

import numpy as np
import pytest
from dm_control import suite

from conftest import ROOT
from wrappers import check_display, default_action_repeat, make_env, parse_task, task_names


def assert_state_is_the_observation(state, observation):
    """`info["state"]` is dm_control's observation dict, in its key order, each part flattened."""
    assert list(state) == list(observation)
    for key, value in observation.items():
        np.testing.assert_array_equal(state[key], np.asarray(value, np.float32).reshape(-1))


def test_action_repeat_sums_rewards_and_stops_at_the_last_step():
    """... and `info["state"]` is the proprioceptive observation of the same step as the frame."""
    env = make_env("cartpole-swingup", seed=5, action_repeat=8, max_episode_length=20)
    reference = suite.load("cartpole", "swingup", task_kwargs={"random": 5})
    obs, info = env.reset()
    assert_state_is_the_observation(info["state"], reference.reset().observation)
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and list(info) == ["state"]
    assert env.state_sizes == {"position": 3, "velocity": 2}
    actions = [np.array([0.7]), np.array([-0.4]), np.array([1.0])]
    results = [env.step(action) for action in actions]
    # 20 environment steps with repeat 8: decisions of 8, 8 and the last 4 steps.
    for (obs, reward, terminated, truncated, info), action, repeat, last in zip(
            results, actions, (8, 8, 4), (False, False, True)):
        time_steps = [reference.step(action) for _ in range(repeat)]
        assert reward == pytest.approx(sum(time_step.reward for time_step in time_steps), rel=1e-6)
        assert (terminated, truncated) == (False, last)
        assert_state_is_the_observation(info["state"], time_steps[-1].observation)
    assert results[-1][4]["env_steps"] == 20
    np.testing.assert_array_equal(
        results[-1][0], reference.physics.render(64, 64, camera_id=0).transpose(2, 0, 1))


def test_full_episode_length_and_clipping():
    env = make_env("cheetah-run", seed=0)
    assert env.action_repeat == 4 and env.action_size == 6
    env.reset()
    action = np.array([5.0, -5.0, 0.3, 1.0, -1.0, 2.0])
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(action)
        # MuJoCo clamps cheetah's motors in its own computation but keeps the control as given:
        # what reaches the physics shows the wrapper's clip.
        np.testing.assert_array_equal(env._env.physics.data.ctrl, [1.0, -1.0, 0.3, 1.0, -1.0, 1.0])
        assert not terminated
        steps += 1
    assert steps == 250


def test_task_names_and_paper_action_repeats():
    assert parse_task("cup-catch") == ("ball_in_cup", "catch")
    assert "walker-walk" in task_names() and "cup-catch" in task_names()
    repeats = {task: default_action_repeat(task) for task in
               ("cartpole-swingup", "reacher-easy", "cheetah-run", "finger-spin", "cup-catch", "walker-walk")}
    assert repeats == {"cartpole-swingup": 8, "reacher-easy": 4, "cheetah-run": 4, "finger-spin": 2,
                       "cup-catch": 4, "walker-walk": 2}
    assert default_action_repeat("hopper-hop") == 4
    with pytest.raises(ValueError, match="known tasks: .*cartpole-swingup"):
        parse_task("cartpole-juggle")


def test_seeded_envs_are_reproducible():
    """An env made with a seed plays the same sequence of episodes as a fresh env of that seed,
    and `reset(seed=...)` restarts that sequence; another seed starts elsewhere."""
    first, second = make_env("reacher-easy", seed=11), make_env("reacher-easy", seed=11)
    episodes = [first.reset()[0], first.reset()[0]]
    np.testing.assert_array_equal(second.reset()[0], episodes[0])
    np.testing.assert_array_equal(second.reset()[0], episodes[1])
    assert not np.array_equal(episodes[0], episodes[1])
    np.testing.assert_array_equal(first.reset(seed=11)[0], episodes[0])
    assert not np.array_equal(make_env("reacher-easy", seed=12).reset()[0], episodes[0])


def test_cheetah_loads_without_mujocos_deprecation_warning():
    """MuJoCo warns through absl that dm_control's cheetah uses the deprecated `settotalmass`: a
    harmless line that looks like an error at the start of `python train.py`. It is filtered;
    other absl warnings still pass."""
    script = ("import logging, wrappers; wrappers.make_env('cheetah-run').reset(); "
              "logging.getLogger('absl').warning('another warning')")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "settotalmass" not in result.stderr and "another warning" in result.stderr


def test_glfw_without_a_display_is_refused_before_mujoco_fails(monkeypatch):
    """MUJOCO_GL=glfw with no display: a dm_control env is refused with what to do (MuJoCo itself
    would fail at the first frame with `gladLoadGL error`); a display, or a Gymnasium task, passes."""
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for obs in ("pixels", "state"):
        with pytest.raises(ValueError, match="MUJOCO_GL=glfw without a display .* set MUJOCO_GL=egl or osmesa"):
            make_env("cartpole-swingup", obs=obs)
    make_env("gym:Pendulum-v1", obs="state").close()
    monkeypatch.setenv("DISPLAY", ":0")
    check_display()
