"""DeepMind Control Suite as a Gymnasium-style env: 64x64 pixels, action repeat, time limit.

`reset()` gives `(obs, info)` and `step(action)` gives `(obs, reward, terminated, truncated, info)`,
where `obs` is a `(3, 64, 64)` uint8 image rendered once per agent decision (PlaNet Sec. 5), and
`info["state"]` the task's proprioceptive observation at the same step (dm_control's observation
dict, e.g. `position` and `velocity`), which the agent never sees: episodes store it beside the
pixels for the camera-ready configuration's state heads and for the state diagnostics.
"""
import functools
import logging
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # Headless rendering unless the user chose otherwise.

import gymnasium as gym
import numpy as np
from dm_control import suite
from dm_control.mujoco.engine import Camera


class _SkipDeprecatedTotalMass(logging.Filter):
    """MuJoCo 3 warns, through absl, that the `settotalmass` compiler attribute of dm_control's own
    cheetah model is deprecated, each time the model is loaded. It is harmless to us, and looked
    like an error to a new user at the start of `python train.py`."""

    def filter(self, record):
        return "settotalmass" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkipDeprecatedTotalMass())


# Action repeat per domain, from the paper's Appendix A and the official `scripts/tasks.py`.
ACTION_REPEAT = {"cartpole": 8, "reacher": 4, "cheetah": 4, "finger": 2, "ball_in_cup": 4, "walker": 2}
DEFAULT_ACTION_REPEAT = 4
# The paper's short names for dm_control domains.
DOMAIN_ALIASES = {"cup": "ball_in_cup"}
PAPER_TASKS = ("cartpole-swingup", "reacher-easy", "cheetah-run", "finger-spin", "cup-catch", "walker-walk")


def _short_domain(domain):
    return {v: k for k, v in DOMAIN_ALIASES.items()}.get(domain, domain)


def task_names():
    """Every `domain-task` name that `make_env` accepts, e.g. `cup-catch` or `walker-walk`."""
    return sorted(f"{_short_domain(domain)}-{task}" for domain, task in suite.ALL_TASKS)


def parse_task(name):
    """`'cup-catch'` -> `('ball_in_cup', 'catch')`; raises ValueError listing the known tasks."""
    domain, _, task = name.partition("-")
    domain = DOMAIN_ALIASES.get(domain, domain)
    if (domain, task) not in suite.ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return domain, task


def default_action_repeat(task):
    return ACTION_REPEAT.get(parse_task(task)[0], DEFAULT_ACTION_REPEAT)


class DMCEnv(gym.Env):
    """A dm_control task seen from 64x64 pixels, with `action_repeat` physics steps per decision.

    Rewards are summed over the repeated steps, and repeating stops at the episode's last step.
    An episode lasts at most `max_episode_length` environment (physics control) steps.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task, seed=0, action_repeat=None, max_episode_length=1000, size=64):
        domain, task_name = parse_task(task)
        self.task = task
        self.action_repeat = action_repeat or default_action_repeat(task)
        self.max_episode_length = max_episode_length
        self.size = size
        self._env = suite.load(domain, task_name, task_kwargs={"random": seed})
        self._camera_id = 2 if domain == "quadruped" else 0
        self._camera = None  # Made at the first frame, with the render context.
        spec = self._env.action_spec()
        self._action_low, self._action_high = spec.minimum, spec.maximum
        self.action_space = gym.spaces.Box(spec.minimum.astype(np.float32), spec.maximum.astype(np.float32),
                                           spec.shape, np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        # The proprioceptive observation, in dm_control's key order, each flattened.
        self.state_sizes = {key: int(np.prod(spec.shape)) for key, spec in self._env.observation_spec().items()}
        self._steps = 0

    @property
    def steps(self):
        """Environment (physics control) steps taken in the current episode."""
        return self._steps

    @property
    def action_size(self):
        return self.action_space.shape[0]

    def _observation(self):
        """Render once, `(3, size, size)` uint8."""
        if self._camera is None:
            # One camera for the whole life of the env: `physics.render` builds a new one, with
            # its scene buffers, for every frame, which costs a tenth of a 64x64 step.
            self._camera = Camera(self._env.physics, self.size, self.size, self._camera_id)
        image = self._camera.render()
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    @staticmethod
    def _state(time_step):
        """dm_control's observation dict -> `{key: (size,) float32}`."""
        return {key: np.asarray(value, np.float32).reshape(-1) for key, value in time_step.observation.items()}

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._env.task.random.seed(seed)
        time_step = self._env.reset()
        self._steps = 0
        return self._observation(), {"state": self._state(time_step)}

    def step(self, action):
        action = np.clip(action, self._action_low, self._action_high)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            time_step = self._env.step(action)
            reward += time_step.reward or 0.0
            self._steps += 1
            # dm_control ends episodes by the time limit (discount 1); discount 0 is a real termination.
            terminated = time_step.last() and time_step.discount == 0
            truncated = (time_step.last() and not terminated) or self._steps >= self.max_episode_length
            if terminated or truncated:
                break
        return (self._observation(), reward, terminated, truncated,
                {"env_steps": self._steps, "state": self._state(time_step)})

    def get_rng_state(self):
        """The state of the task's generator, which draws each episode's initial conditions."""
        return self._env.task.random.get_state()

    def set_rng_state(self, state):
        self._env.task.random.set_state(state)

    def render(self):
        return self._observation().transpose(1, 2, 0)

    def close(self):
        self._camera = None  # Before the physics whose render context it uses.
        self._env.close()


def make_env(task, seed=0, action_repeat=None, max_episode_length=1000):
    return DMCEnv(task, seed=seed, action_repeat=action_repeat, max_episode_length=max_episode_length)


def make_parallel_envs(task, count, action_repeat=None, max_episode_length=1000):
    """`count` copies of the env stepped together, each in its own worker process so that physics
    and rendering use every core. Seed their episodes with `reset(seed=[...])`.

    Workers are spawned, not forked: a fork would copy this process's EGL and CUDA state. Nothing
    resets an env behind the caller's back (autoreset off); stepping a finished one is harmless.
    """
    make = functools.partial(make_env, task, 0, action_repeat, max_episode_length)
    return gym.vector.AsyncVectorEnv([make] * count, context="spawn",
                                     autoreset_mode=gym.vector.AutoresetMode.DISABLED)
