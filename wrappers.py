"""DeepMind Control Suite tasks and Gymnasium envs from pixels: 64x64 images, action repeat, time limit.

`reset()` gives `(obs, info)` and `step(action)` gives `(obs, reward, terminated, truncated, info)`,
where `obs` is a `(3, 64, 64)` uint8 image rendered once per agent decision (PlaNet Sec. 5), and
`info["state"]` the task's proprioceptive observation at the same step (dm_control's observation
dict, e.g. `position` and `velocity`), which the agent never sees: episodes store it beside the
pixels for the camera-ready configuration's state heads and for the state diagnostics.

A task is a dm_control `domain-task` (`DMCEnv`) or `gym:ID`, any registered Gymnasium env with a
bounded continuous action space that renders `rgb_array` frames (`GymEnv`, the same interface).
"""
import difflib
import functools
import importlib
import logging
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # Headless rendering unless the user chose otherwise.

import cv2
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
GYM_PREFIX = "gym:"  # `gym:Pendulum-v1`, `gym:Hopper-v5`, or `gym:my_module:MyEnv-v0` (imports my_module).
# Action repeat of Gymnasium tasks: the paper has none, and the official code's one Gym task,
# gym_cheetah, repeats 2 in the camera-ready version (0c6f7d3 `scripts/tasks.py:100`) and 1 at HEAD
# (c04226b `scripts/tasks.py:108`). 2 halves the decisions per episode, so the planner's 12 steps
# see twice as far, at little cost in control: Gymnasium's MuJoCo envs already skip frames.
GYM_ACTION_REPEAT = 2


def _short_domain(domain):
    return {v: k for k, v in DOMAIN_ALIASES.items()}.get(domain, domain)


def task_names():
    """Every `domain-task` name that `make_env` accepts, e.g. `cup-catch` or `walker-walk`; any
    `gym:ID` of a registered Gymnasium env with continuous actions works too (`parse_task`)."""
    return sorted(f"{_short_domain(domain)}-{task}" for domain, task in suite.ALL_TASKS)


def make_gym(env_id):
    """`gymnasium.make(env_id, render_mode="rgb_array")`, checked: raises ValueError unless the id
    is registered, the action space is a bounded `(n,)` Box and the env renders rgb_array frames."""
    module, _, name = env_id.rpartition(":")
    try:
        if module:  # Gymnasium's `module:ID`: importing the module registers its envs.
            importlib.import_module(module)
        gym.spec(name)
    except (gym.error.Error, ImportError) as error:
        close = difflib.get_close_matches(name, gym.registry, n=3)
        hint = f"did you mean {', '.join(GYM_PREFIX + c for c in close)}?" if close else \
            "python -c 'import gymnasium; gymnasium.pprint_registry()' lists the registered ids"
        raise ValueError(f"unknown Gymnasium env {GYM_PREFIX}{env_id} ({error}); {hint}") from None
    try:
        env = gym.make(env_id, render_mode="rgb_array")
    except TypeError as error:  # An env whose constructor takes no render_mode.
        raise ValueError(f"{GYM_PREFIX}{env_id} cannot render rgb_array pixels ({error})") from None
    space = env.action_space
    bounded = isinstance(space, gym.spaces.Box) and space.is_bounded() and len(space.shape) == 1
    problem = (f"its action space is {space}" if not bounded else
               f"its render modes are {env.metadata.get('render_modes')}"
               if "rgb_array" not in env.metadata.get("render_modes", []) else None)
    if problem:
        env.close()
        raise ValueError(f"{GYM_PREFIX}{env_id}: {problem}; PlaNet needs a bounded continuous "
                         "action space, a Box of shape (n,), and rgb_array rendering")
    return env


@functools.cache
def _check_gym(env_id):
    make_gym(env_id).close()


def parse_task(name):
    """`'cup-catch'` -> `('ball_in_cup', 'catch')`, `'gym:Hopper-v5'` -> `('gym', 'Hopper-v5')`;
    raises ValueError listing the known tasks, or saying what a Gymnasium env lacks."""
    if name.startswith(GYM_PREFIX):
        _check_gym(name[len(GYM_PREFIX):])
        return "gym", name[len(GYM_PREFIX):]
    domain, _, task = name.partition("-")
    domain = DOMAIN_ALIASES.get(domain, domain)
    if (domain, task) not in suite.ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return domain, task


def default_action_repeat(task):
    domain = parse_task(task)[0]
    return GYM_ACTION_REPEAT if domain == "gym" else ACTION_REPEAT.get(domain, DEFAULT_ACTION_REPEAT)


class PixelEnv(gym.Env):
    """What every env of a task shares: `(3, size, size)` uint8 frames from `_observation()`, the
    planner's actions in [-1, 1] (`action_space`), and the count of env steps in the episode."""

    metadata = {"render_modes": ["rgb_array"]}
    _steps = 0

    @property
    def steps(self):
        """Environment (physics control) steps taken in the current episode."""
        return self._steps

    @property
    def action_size(self):
        return self.action_space.shape[0]

    def render(self):
        return self._observation().transpose(1, 2, 0)


class DMCEnv(PixelEnv):
    """A dm_control task seen from 64x64 pixels, with `action_repeat` physics steps per decision.

    Rewards are summed over the repeated steps, and repeating stops at the episode's last step.
    An episode lasts at most `max_episode_length` environment (physics control) steps.
    """

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

    def close(self):
        self._camera = None  # Before the physics whose render context it uses.
        self._env.close()


class GymEnv(PixelEnv):
    """A Gymnasium env (`gym:ID`) seen from 64x64 pixels, with the interface of `DMCEnv`.

    The planner's actions in [-1, 1] are scaled linearly to the env's action bounds. Each decision
    repeats the action `action_repeat` env steps, summing their rewards, and stops at the end of
    the episode: a termination (e.g. Hopper falls), the env's own time limit, or
    `max_episode_length` env steps. Each frame is the env's rgb_array render, resized with
    INTER_AREA. `info["state"]` is the env's own observation vector when it is a flat Box.
    The env's generator is seeded at the first reset with `seed`, or by `reset(seed=...)`.
    """

    def __init__(self, task, seed=0, action_repeat=None, max_episode_length=1000, size=64):
        self.task = task
        self.action_repeat = action_repeat or default_action_repeat(task)
        self.max_episode_length = max_episode_length
        self.size = size
        self._env = make_gym(parse_task(task)[1])
        space = self._env.action_space
        self._action_low, self._action_high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        observation = self._env.observation_space
        flat = isinstance(observation, gym.spaces.Box) and len(observation.shape) == 1
        self.state_sizes = {"observation": observation.shape[0]} if flat else {}
        self._seed = seed  # For the first reset, unless a generator state is set first.
        self._steps = 0

    def _observation(self):
        """Render once, `(3, size, size)` uint8."""
        frame = self._env.render()
        if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] in (3, 4)):
            raise ValueError(f"{self.task} rendered {type(frame).__name__} "
                             f"{getattr(frame, 'shape', '')}, not an RGB image")
        frame = cv2.resize(np.ascontiguousarray(frame[..., :3]), (self.size, self.size),
                           interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.uint8)

    def _state(self, observation):
        return {"observation": np.asarray(observation, np.float32).reshape(-1)} if self.state_sizes else {}

    def reset(self, *, seed=None, options=None):
        seed, self._seed = self._seed if seed is None else seed, None
        observation, _ = self._env.reset(seed=seed, options=options)
        self._steps = 0
        return self._observation(), {"state": self._state(observation)}

    def step(self, action):
        fraction = (np.clip(action, -1, 1) + 1) / 2
        action = np.clip(self._action_low + fraction * (self._action_high - self._action_low),
                         self._action_low, self._action_high).astype(self._env.action_space.dtype)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            observation, step_reward, terminated, truncated, _ = self._env.step(action)
            reward += float(step_reward)
            self._steps += 1
            truncated = truncated or self._steps >= self.max_episode_length
            if terminated or truncated:
                break
        return (self._observation(), reward, terminated, truncated,
                {"env_steps": self._steps, "state": self._state(observation)})

    def get_rng_state(self):
        """The state of the env's generator (`np_random`), which draws each episode's initial
        conditions: a numpy bit generator's state dict."""
        if self._seed is not None:  # Not reset yet: the generator that the first reset will seed.
            return np.random.default_rng(self._seed).bit_generator.state
        return self._env.unwrapped.np_random.bit_generator.state

    def set_rng_state(self, state):
        generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
        generator.bit_generator.state = state
        self._env.unwrapped.np_random = generator
        self._seed = None  # The next reset continues this stream.

    def close(self):
        self._env.close()


def make_env(task, seed=0, action_repeat=None, max_episode_length=1000):
    """`GymEnv` for a `gym:ID` task, else `DMCEnv`."""
    env = GymEnv if task.startswith(GYM_PREFIX) else DMCEnv
    return env(task, seed=seed, action_repeat=action_repeat, max_episode_length=max_episode_length)


def make_parallel_envs(task, count, action_repeat=None, max_episode_length=1000):
    """`count` copies of the env stepped together, each in its own worker process so that physics
    and rendering use every core. Seed their episodes with `reset(seed=[...])`.

    Workers are spawned, not forked: a fork would copy this process's EGL and CUDA state. Nothing
    resets an env behind the caller's back (autoreset off); stepping a finished one is harmless.
    """
    make = functools.partial(make_env, task, 0, action_repeat, max_episode_length)
    return gym.vector.AsyncVectorEnv([make] * count, context="spawn",
                                     autoreset_mode=gym.vector.AutoresetMode.DISABLED)
