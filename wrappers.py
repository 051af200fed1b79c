"""DeepMind Control Suite tasks and Gymnasium envs, seen from pixels or from states: 64x64 images
or observation vectors, action repeat, time limit.

`reset()` gives `(obs, info)` and `step(action)` gives `(obs, reward, terminated, truncated, info)`.
From pixels (`obs="pixels"`, the paper's setting), `obs` is a `(3, 64, 64)` uint8 image rendered
once per agent decision (PlaNet Sec. 5). From states (`obs="state"`, `--obs state`), it is the env's
own observation, a float32 vector: dm_control's observation dict flattened in its key order
(`flatten_state`), or a Gymnasium env's flat Box observation; nothing is rendered unless `frames`
asks for an image of each step as `info["frame"]`, for videos. Either way `info["state"]` is the
task's proprioceptive observation at the same step (dm_control's observation dict, e.g. `position`
and `velocity`): episodes store it for the camera-ready configuration's state heads and for the
state diagnostics.

A task is a dm_control `domain-task` (`DMCEnv`) or `gym:ID`, any registered Gymnasium env with a
bounded continuous action space that renders `rgb_array` frames (`GymEnv`, the same interface).
"""
import difflib
import functools
import importlib
import logging
import os
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")  # Headless rendering unless the user chose otherwise.

import cv2
import gymnasium as gym
import numpy as np

# What each of MuJoCo's rendering back-ends needs on Debian or Ubuntu.
RENDERING_NEEDS = {
    "egl": "the EGL libraries: sudo apt-get install libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri "
           "(an NVIDIA driver brings its own)",
    "osmesa": "OSMesa: sudo apt-get install libosmesa6",
    "glfw": "GLFW and a display: sudo apt-get install libglfw3, and a DISPLAY (or xvfb-run)",
}


def rendering_error(error):
    """The one line that says what to install when MuJoCo's renderer cannot load."""
    backend = os.environ["MUJOCO_GL"]
    need = RENDERING_NEEDS.get(backend, f"one of MUJOCO_GL={', '.join(RENDERING_NEEDS)}")
    return (f"error: MuJoCo cannot render with MUJOCO_GL={backend} ({type(error).__name__}: {error}); "
            f"install {need}, or set MUJOCO_GL to another of {', '.join(RENDERING_NEEDS)}")


try:
    from dm_control import suite
    from dm_control.mujoco.engine import Camera
except ModuleNotFoundError:
    raise
except Exception as error:  # A missing GL library fails deep inside PyOpenGL, at dm_control's import.
    raise SystemExit(rendering_error(error)) from None


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
# Several tasks in one run (`--task a,b,c`), or by name: the paper's multi-task agent of Sec. 5,
# Figure 6, on the official code's `tasks: all`, in its order (0c6f7d3 `scripts/configs.py:96-100`).
MULTI_TASKS = {"all": ("cartpole-balance", "cartpole-swingup", "finger-spin", "cheetah-run", "cup-catch",
                       "walker-walk")}
GYM_PREFIX = "gym:"  # `gym:Pendulum-v1`, `gym:Hopper-v5`, or `gym:my_module:MyEnv-v0` (imports my_module).
# Action repeat of Gymnasium tasks: the paper has none, and the official code's one Gym task,
# gym_cheetah, repeats 2 in the camera-ready version (0c6f7d3 `scripts/tasks.py:100`) and 1 at HEAD
# (c04226b `scripts/tasks.py:108`). 2 halves the decisions per episode, so the planner's 12 steps
# see twice as far, at little cost in control: Gymnasium's MuJoCo envs already skip frames.
GYM_ACTION_REPEAT = 2
OBSERVATIONS = ("pixels", "state")  # What the agent sees: `--obs`.


def _short_domain(domain):
    return {v: k for k, v in DOMAIN_ALIASES.items()}.get(domain, domain)


def task_names():
    """Every `domain-task` name that `make_env` accepts, e.g. `cup-catch` or `walker-walk`; any
    `gym:ID` of a registered Gymnasium env with continuous actions works too (`parse_task`)."""
    return sorted(f"{_short_domain(domain)}-{task}" for domain, task in suite.ALL_TASKS)


def make_gym(env_id, obs=None):
    """`gymnasium.make(env_id, render_mode="rgb_array")`, checked. -> the env and whether it renders
    rgb_array frames. Raises ValueError unless the id is registered and the action space is a
    bounded `(n,)` Box; from pixels (`obs="pixels"`), unless the env renders rgb_array frames; from
    states (`obs="state"`), unless its observation space is a flat Box. An env whose constructor
    takes no render mode is made without one, when not from pixels."""
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
        with warnings.catch_warnings():  # That an env renders no rgb_array: said below if it matters.
            warnings.filterwarnings("ignore", message=".*render_mode.*")
            env = gym.make(env_id, render_mode="rgb_array")
        renders = "rgb_array" in env.metadata.get("render_modes", [])
    except TypeError as error:
        if obs == "pixels":
            raise ValueError(f"{GYM_PREFIX}{env_id} cannot render rgb_array pixels ({error}); "
                             "--obs state learns from its observation vector instead") from None
        env, renders = gym.make(env_id), False
    space, observation = env.action_space, env.observation_space
    if not (isinstance(space, gym.spaces.Box) and space.is_bounded() and len(space.shape) == 1):
        problem = (f"its action space is {space}; PlaNet needs a bounded continuous action space, "
                   "a Box of shape (n,)")
    elif obs == "pixels" and not renders:
        problem = (f"its render modes are {env.metadata.get('render_modes')}; learning from pixels needs "
                   "rgb_array rendering (--obs state learns from its observation vector instead)")
    elif obs == "state" and not flat_box(observation):
        problem = f"its observation space is {observation}; --obs state needs a flat Box of shape (n,)"
    else:
        return env, renders
    env.close()
    raise ValueError(f"{GYM_PREFIX}{env_id}: {problem}")


def flat_box(space):
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 1


@functools.cache
def check_gym(env_id, obs=None):
    """`make_gym`'s checks, once per process for each env and observation."""
    make_gym(env_id, obs)[0].close()


def parse_task(name):
    """`'cup-catch'` -> `('ball_in_cup', 'catch')`, `'gym:Hopper-v5'` -> `('gym', 'Hopper-v5')`;
    raises ValueError listing the known tasks, or saying what a Gymnasium env lacks."""
    if name.startswith(GYM_PREFIX):
        check_gym(name[len(GYM_PREFIX):])
        return "gym", name[len(GYM_PREFIX):]
    domain, _, task = name.partition("-")
    domain = DOMAIN_ALIASES.get(domain, domain)
    if (domain, task) not in suite.ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return domain, task


def task_list(task):
    """The tasks of a run: `'cheetah-run'` -> `['cheetah-run']`; `'a,b'` or a name of MULTI_TASKS,
    e.g. `'all'`, -> the tasks of a multi-task run, in their order."""
    return list(MULTI_TASKS.get(task, task.split(",")))


def check_task(task, obs="pixels"):
    """`parse_task`'s checks for each of the run's tasks (`task_list`), and that they can be seen
    from `obs` (OBSERVATIONS); raises ValueError saying what is missing."""
    tasks = task_list(task)
    if len(set(tasks)) < len(tasks):
        raise ValueError(f"--task {task} names a task twice")
    if obs not in OBSERVATIONS:
        raise ValueError(f"unknown observation {obs!r}; known: {', '.join(OBSERVATIONS)}")
    if len(tasks) > 1 and obs != "pixels":
        raise ValueError("a multi-task run learns from pixels: the tasks' state vectors differ in size")
    for name in tasks:
        parse_task(name)
        if name.startswith(GYM_PREFIX):
            check_gym(name[len(GYM_PREFIX):], obs)


def default_action_repeat(task):
    domain = parse_task(task)[0]
    return GYM_ACTION_REPEAT if domain == "gym" else ACTION_REPEAT.get(domain, DEFAULT_ACTION_REPEAT)


def flatten_state(state):
    """A state dict `{key: (size,) float32}` -> one `(sum of sizes,)` float32 vector, its parts in
    the dict's order: dm_control's observation spec order, as Kaixhin/PlaNet's `--symbolic-env`."""
    return np.concatenate(list(state.values())).astype(np.float32, copy=False)


def state_labels(state_sizes):
    """The name of each dimension of `flatten_state`'s vector: `{"position": 2}` -> `["position[0]",
    "position[1]"]`."""
    return [f"{key}[{i}]" for key, size in state_sizes.items() for i in range(size)]


class TaskEnv(gym.Env):
    """What every env of a task shares: the planner's actions in [-1, 1] (`action_space`), the count
    of env steps in the episode, and its observation, from pixels or from states (`_observe`)."""

    metadata = {"render_modes": ["rgb_array"]}
    renders = True  # Whether `_render` can draw a frame.
    _steps = 0
    _own_action_size = None  # With padded actions, the dimensions that the task uses.

    def pad_actions(self, size):
        """Take actions of `size` dimensions in [-1, 1], of which the task uses its own first and
        ignores the rest: a multi-task run's action space, the widest of its tasks' (the official
        `PadActions`, 0c6f7d3 `control/wrappers.py:398-424`; our tasks' bounds are [-1, 1])."""
        self._own_action_size = self.action_space.shape[0]
        if size < self._own_action_size:
            raise ValueError(f"{self.task} has {self._own_action_size} action dimensions, more than {size}")
        self.action_space = gym.spaces.Box(-1.0, 1.0, (size,), np.float32)

    def _own_action(self, action):
        return np.asarray(action)[:self._own_action_size]

    def _set_observation(self, obs, frames, state_sizes):
        """What `_observe` returns: `(3, size, size)` uint8 frames, or from states a float32 vector
        of the sizes' sum, and with `frames` (an attribute that may be set later) a frame beside it."""
        if obs not in OBSERVATIONS:
            raise ValueError(f"unknown observation {obs!r}; known: {', '.join(OBSERVATIONS)}")
        if frames and not self.renders:
            raise ValueError(f"{self.task} renders no rgb_array frames to show or to write as video")
        self.obs, self.frames, self.state_sizes = obs, frames and obs == "state", state_sizes
        self.observation_space = (gym.spaces.Box(0, 255, (3, self.size, self.size), np.uint8) if obs == "pixels" else
                                  gym.spaces.Box(-np.inf, np.inf, (sum(state_sizes.values()),), np.float32))

    def _observe(self, state):
        """The observation of a step and its info: the task's state dict as `info["state"]`, and
        from states with `frames`, the frame as `info["frame"]`."""
        if self.obs == "pixels":
            return self._render(), {"state": state}
        return flatten_state(state), {"state": state, **({"frame": self._render()} if self.frames else {})}

    @property
    def steps(self):
        """Environment (physics control) steps taken in the current episode."""
        return self._steps

    @property
    def action_size(self):
        return self.action_space.shape[0]

    def render(self):
        return self._render().transpose(1, 2, 0)


class DMCEnv(TaskEnv):
    """A dm_control task seen from 64x64 pixels or from its observation dict, with `action_repeat`
    physics steps per decision.

    Rewards are summed over the repeated steps, and repeating stops at the episode's last step.
    An episode lasts at most `max_episode_length` environment (physics control) steps.
    """

    def __init__(self, task, seed=0, action_repeat=None, max_episode_length=1000, size=64, obs="pixels",
                 frames=False):
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
        # The proprioceptive observation, in dm_control's key order, each flattened.
        self._set_observation(obs, frames, {key: int(np.prod(spec.shape))
                                            for key, spec in self._env.observation_spec().items()})
        self._steps = 0

    def _render(self):
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
        return self._observe(self._state(time_step))

    def step(self, action):
        action = np.clip(self._own_action(action), self._action_low, self._action_high)
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
        obs, info = self._observe(self._state(time_step))
        return obs, reward, terminated, truncated, {"env_steps": self._steps, **info}

    def get_rng_state(self):
        """The state of the task's generator, which draws each episode's initial conditions."""
        return self._env.task.random.get_state()

    def set_rng_state(self, state):
        self._env.task.random.set_state(state)

    def close(self):
        self._camera = None  # Before the physics whose render context it uses.
        self._env.close()


class GymEnv(TaskEnv):
    """A Gymnasium env (`gym:ID`) seen from 64x64 pixels or from its observation vector, with the
    interface of `DMCEnv`.

    The planner's actions in [-1, 1] are scaled linearly to the env's action bounds. Each decision
    repeats the action `action_repeat` env steps, summing their rewards, and stops at the end of
    the episode: a termination (e.g. Hopper falls), the env's own time limit, or
    `max_episode_length` env steps. Each frame is the env's rgb_array render, resized with
    INTER_AREA. `info["state"]` is the env's own observation vector when it is a flat Box.
    The env's generator is seeded at the first reset with `seed`, or by `reset(seed=...)`.
    """

    def __init__(self, task, seed=0, action_repeat=None, max_episode_length=1000, size=64, obs="pixels",
                 frames=False):
        self.task = task
        self.action_repeat = action_repeat or default_action_repeat(task)
        self.max_episode_length = max_episode_length
        self.size = size
        self._env, self.renders = make_gym(parse_task(task)[1], obs)
        space = self._env.action_space
        self._action_low, self._action_high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)
        observation = self._env.observation_space
        self._set_observation(obs, frames, {"observation": observation.shape[0]} if flat_box(observation) else {})
        self._seed = seed  # For the first reset, unless a generator state is set first.
        self._steps = 0

    def _render(self):
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
        return self._observe(self._state(observation))

    def step(self, action):
        fraction = (np.clip(self._own_action(action), -1, 1) + 1) / 2
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
        obs, info = self._observe(self._state(observation))
        return obs, reward, terminated, truncated, {"env_steps": self._steps, **info}

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


def check_display():
    """MUJOCO_GL=glfw renders through a window: without a display, MuJoCo would fail only at the first
    frame, deep in its GL loader (`gladLoadGL error`). Raises ValueError saying what to do instead."""
    if os.environ["MUJOCO_GL"] == "glfw" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("MuJoCo cannot render with MUJOCO_GL=glfw without a display (DISPLAY is not set); "
                         "set MUJOCO_GL=egl or osmesa to render headless, or run under xvfb-run")


def make_env(task, seed=0, action_repeat=None, max_episode_length=1000, obs="pixels", frames=False,
             action_size=None):
    """`GymEnv` for a `gym:ID` task, else `DMCEnv`, seen from `obs` (OBSERVATIONS); from states,
    `frames` renders each step's frame too, as `info["frame"]`. `action_size` pads its actions to
    that many dimensions (`TaskEnv.pad_actions`). Raises ValueError for a dm_control env where
    MuJoCo cannot render (`check_display`), even from states: video_prediction.py may ask it for
    frames later."""
    kind = GymEnv if task.startswith(GYM_PREFIX) else DMCEnv
    if kind is DMCEnv:
        check_display()
    env = kind(task, seed=seed, action_repeat=action_repeat, max_episode_length=max_episode_length, obs=obs,
               frames=frames)
    if action_size is not None:
        env.pad_actions(action_size)
    return env


def make_parallel_envs(task, count, action_repeat=None, max_episode_length=1000, obs="pixels", frames=False,
                       action_size=None):
    """`count` copies of the env stepped together, each in its own worker process so that physics
    and rendering use every core. Seed their episodes with `reset(seed=[...])`.

    Workers are spawned, not forked: a fork would copy this process's EGL and CUDA state. Nothing
    resets an env behind the caller's back (autoreset off); stepping a finished one is harmless.
    """
    make = functools.partial(make_env, task, 0, action_repeat, max_episode_length, obs, frames, action_size)
    return gym.vector.AsyncVectorEnv([make] * count, context="spawn",
                                     autoreset_mode=gym.vector.AutoresetMode.DISABLED)
