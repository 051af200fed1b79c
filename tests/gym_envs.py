"""Tiny Gymnasium envs for the tests, registered on import: `gym:tests.gym_envs:PlanetTest/...`
(Gymnasium's `module:ID` imports this module first, in a subprocess or a worker too)."""
import gymnasium as gym
import numpy as np


class Recorder(gym.Env):
    """Asymmetric action bounds [-2, 0.5] x [0, 10]; keeps every action it is given. The reward of
    env step t (from 1) is t, and the episode terminates at step `terminate_at`. The observation is
    (t, a random start drawn from `np_random` at reset); each frame is filled with 10 t."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None, terminate_at=7):
        self.action_space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([0.5, 10.0], np.float32))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.render_mode, self.terminate_at = render_mode, terminate_at
        self.actions, self.t, self.start = [], 0, 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.start = 0, float(self.np_random.uniform())
        return np.array([0.0, self.start], np.float32), {}

    def step(self, action):
        self.actions.append(np.array(action))
        self.t += 1
        return (np.array([self.t, self.start], np.float32), float(self.t), self.t >= self.terminate_at,
                False, {})

    def render(self):
        return np.full((100, 80, 3), 10 * self.t, np.uint8)


class NoRender(Recorder):
    """Renders no pixels: its constructor takes no render_mode."""

    metadata = {"render_modes": []}

    def __init__(self):
        super().__init__()


class HumanOnly(Recorder):
    """Takes a render_mode, but renders for people only."""

    metadata = {"render_modes": ["human"]}


class ImageObservation(Recorder):
    """Observes an image, not a vector."""

    def __init__(self, render_mode=None):
        super().__init__(render_mode)
        self.observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)


class Falls(Recorder):
    """Terminates at a step drawn at reset from `np_random`, 2 to 9: parallel episodes of different
    seeds end at different steps. The reward of step t is t."""

    def reset(self, *, seed=None, options=None):
        observation, info = super().reset(seed=seed, options=options)
        self.terminate_at = int(self.np_random.integers(2, 10))
        return observation, info


gym.register("PlanetTest/Recorder-v0", entry_point=Recorder, max_episode_steps=50)
gym.register("PlanetTest/Short-v0", entry_point=Recorder, kwargs={"terminate_at": 3})
gym.register("PlanetTest/Falls-v0", entry_point=Falls)
gym.register("PlanetTest/NoRender-v0", entry_point=NoRender)
gym.register("PlanetTest/HumanOnly-v0", entry_point=HumanOnly)
gym.register("PlanetTest/ImageObservation-v0", entry_point=ImageObservation)
