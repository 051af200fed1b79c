"""Train PlaNet from pixels (or states, `--obs state`): `python train.py --task cheetah-run`,
`python train.py --resume RUN_DIR`.

Algorithm 1 of the paper: a few seed episodes with random actions, then repeat: C model updates on
chunks sampled from the replay buffer, one episode collected with the CEM planner plus exploration
noise, and every few episodes a noise-free test. Everything goes into `<log-dir>/<task>/<time>/`,
and a checkpoint after every episode lets a killed run continue where it was.
"""
import dataclasses
import functools
import io
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from agent import Agent, episode_frames, planner_policy, play_episode, play_episodes, random_policy
from capture import CapturedGradients
from config import parse_args
from diagnostics import open_loop_errors, open_loop_prediction
from logger import EpisodeProgress, hyperparameter_table, start_wandb
from runs import CHECKPOINT, build_envs, build_model, build_replay, make_run_dir, read_checkpoint, test_seeds
from utils import (BatchPrefetcher, append_jsonl, atomic_write, derive_seed, episode_index, episode_paths,
                   global_rng_state, keep_freed_memory, load_episode, outgoing_reward_chunks, pack_random_state,
                   read_jsonl, resolve_device, save_episode, set_global_rng_state, set_matmul_precision,
                   set_seed_everywhere, unpack_random_state, write_json, write_jsonl)
from video import add_gif, episode_mosaic, state_plot
from wrappers import make_parallel_envs, state_labels

BATCH_NOISE_TAG = 20_000  # Tags the seed of the batches' dequantisation noise.
CUDA_RESEED_TAG = 30_000  # Tags the seed of the CUDA generators when a CPU checkpoint resumes on CUDA.
VIDEO_FRAMES = 100  # Of the first test episode, logged to TensorBoard as a GIF at each test.
DAY = 24 * 3600  # Seconds: a projected run longer than this on a CPU is worth a warning.


class NothingToTrainOn(RuntimeError):
    """The replay holds no chunk after the seed episodes: the run stops rather than collect forever."""


# --- One update and C of them. ---

def gradient_function(model, device, compile_update=False, capture_update=False):
    """-> `gradients(*loss_args) -> (loss, terms)`, which leaves d loss / d parameters in `.grad`.

    Eager: zero the gradients, `model.loss`, backward. `--capture-update` (CUDA): the eager loss
    and its backward captured as one CUDA graph per batch shape (`capture.CapturedGradients`), so
    that the L-step RSSM unroll, some thousands of small kernels, is one launch; no compiler.
    `--compile-update` runs `model.loss` through `torch.compile`, which also compiles its
    backward (AOTAutograd), and on CUDA captures the compiled pair likewise; random draws stay
    eager PyTorch's (`fallback_random`), so a seed gives the eager loss up to float rounding.
    Inductor's layout optimisation stays off on CUDA: it turns the decoder's transposed convs
    channels-last, whose backward cuDNN returns in other strides than Inductor expects
    (pytorch/pytorch#171622; it failed our device test on an H200). Gradient clipping and Adam
    stay eager: a handful of multi-tensor kernels. A CPU has no graphs: `--capture-update` is
    eager there."""
    cuda = torch.device(device).type == "cuda"
    loss_fn = model.loss
    if compile_update:
        options = {"fallback_random": True, **({"layout_optimization": False} if cuda else {})}
        loss_fn = torch.compile(model.loss, dynamic=False, options=options)
    if cuda and (compile_update or capture_update):
        return CapturedGradients(loss_fn, model.parameters())
    return functools.partial(eager_gradients, model, loss_fn)


def eager_gradients(model, loss_fn, *args):
    model.zero_grad(set_to_none=True)
    loss, terms = loss_fn(*args)
    loss.backward()
    return loss, terms


def loss_arguments(model, batch, config):
    """The arguments of `model.loss` (and of `gradient_function`'s gradients) for a batch of
    preprocessed chunks `(obs, actions, rewards, *states)` on the model's device, as the replay
    gives them (`build_replay`), and where episodes end early (`config.ends_early`) their
    `terminal` and `valid` steps last; aligned as `--reward-alignment` says."""
    obs, actions, rewards, *states = batch
    terminal = valid = None
    if config.ends_early:
        *states, terminal, valid = states
    if config.reward_alignment == "outgoing":
        obs, actions, rewards, *states = outgoing_reward_chunks(obs, actions, rewards, *states)
        if valid is not None:  # Step t is the stored t with the reward and termination of t + 1.
            terminal, valid = terminal[1:], valid[1:]
    return (obs, actions, rewards, config.free_nats, config.reward_scale, config.overshooting_distance,
            config.overshooting_kl_beta, config.overshooting_reward_scale, config.global_kl_beta,
            dict(zip(model.state_models, states)), terminal, valid, config.continue_scale)


def build_optimizer(model, config):
    """Adam (paper: lr 1e-3, eps 1e-4), fused: one kernel for the whole step on either device where
    the loop over parameters launches some ten per parameter (4x faster here on a CPU), the same
    arithmetic up to float rounding."""
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_epsilon, fused=True)


def load_optimizer_state(optimizer, state):
    """Load Adam's moments and steps from a checkpoint, keeping this code's implementation: a
    checkpoint written before Adam was fused says `fused: None`, which would undo it."""
    implementation = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **implementation}
                                                         for group in state["param_groups"]]})


def clip_gradients(model, config):
    """Clip the gradients' global norm to `--grad-clip-norm`, in a few `foreach` kernels for all
    parameters (PyTorch's default on CUDA only). -> the norm before clipping, a tensor (no host
    sync)."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm, foreach=True)


def update(model, optimizer, batch, config, step, gradients=None):
    """Gradient step number `step` (from 0) on a batch as `loss_arguments` takes it, its gradients
    from `gradients` (`gradient_function`; default eager). Returns the detached loss terms; no
    host sync unless --nan-policy skip, which must look at the loss before stepping."""
    warmup = min(1.0, step / config.warmup_updates) if config.warmup_updates else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * warmup
    gradients = gradients or gradient_function(model, batch[0].device)
    loss, terms = gradients(*loss_arguments(model, batch, config))
    terms["grad_norm"] = clip_gradients(model, config)
    # A skipped step leaves the gradients for the next update to overwrite.
    if config.nan_policy != "skip" or torch.isfinite(loss + terms["grad_norm"]):
        optimizer.step()
    return terms


def train_model(model, optimizer, buffer, config, device, generator, first_update, gradients=None,
                on_update=None):
    """C updates on batches prefetched in the background, their dequantisation noise drawn from
    `generator`; `on_update(done, C)` after each. Returns their mean terms; raises
    FloatingPointError naming the first non-finite update unless --nan-policy skip."""
    model.train()
    start = time.perf_counter()
    batches = BatchPrefetcher(buffer, config.batch_size, config.collect_interval, device,
                              config.bit_depth, generator)
    history = []
    for i, batch in enumerate(batches):
        history.append(update(model, optimizer, batch, config, first_update + i, gradients))
        if on_update is not None:
            on_update(i + 1, config.collect_interval)
    model.eval()
    terms = {name: torch.stack([h[name] for h in history]).cpu() for name in history[0]}
    finite = torch.stack(list(terms.values())).isfinite().all(0)
    if not finite.all() and config.nan_policy == "stop":
        bad = int((~finite).nonzero()[0])
        values = ", ".join(f"{name} {float(v[bad]):.4g}" for name, v in terms.items())
        raise FloatingPointError(f"non-finite loss at update {first_update + bad + 1}: {values}; "
                                 "the last checkpoint is untouched")
    metrics = {("train/" if name == "grad_norm" else "loss/") + name: float(v[finite].mean())
               for name, v in terms.items() if finite.any()}
    metrics["train/skipped_updates"] = int((~finite).sum())
    metrics["speed/updates_per_s"] = config.collect_interval / (time.perf_counter() - start)
    return metrics


def test(model, envs, config, first_index, run_dir):
    """Noise-free planner episodes in the parallel `envs`, one each, saved from `first_index` on.
    -> the episodes."""
    agent = Agent(model, config.planner, config.bit_depth, batch_size=envs.num_envs,
                  plan=config.plan(next(model.parameters()).device))
    episodes = play_episodes(envs, agent, test_seeds(config.seed, first_index, envs.num_envs))
    for i, episode in enumerate(episodes):
        save_episode(Path(run_dir) / "episodes" / "test", first_index + i, episode)
    return episodes


def return_metrics(episodes, suffix=""):
    returns = np.array([episode["reward"].sum() for episode in episodes])
    return {f"test/return{suffix}": float(returns.mean()), f"test/return_std{suffix}": float(returns.std())}


def prediction_media(model, episode, config, state_sizes):
    """What TensorBoard shows of a test episode: an image `(3, H, W)` of its open-loop prediction,
    a strip of ground truth (top) over prediction (bottom), or from states a plot of each dimension
    (named from `state_sizes`); and its first `VIDEO_FRAMES` frames `(T, 3, 64, 64)`, or None from
    states without frames."""
    truth, prediction = open_loop_prediction(model, episode, context=5, length=50, bit_depth=config.bit_depth)
    if config.obs == "pixels":
        image = np.concatenate([np.concatenate(list(frames[::5]), axis=2) for frames in (truth, prediction)],
                               axis=1)
    else:
        image = state_plot(truth, prediction, 5, state_labels(state_sizes)).transpose(2, 0, 1)
    frames = episode_frames(episode)
    return image, None if frames is None else frames[:VIDEO_FRAMES]


class Workspace:
    """Everything a run holds: envs, model, optimizer, replay buffer, counters, generators, logs.

    A multi-task run (Sec. 5, Figure 6) has one env per task, all with the widest task's actions,
    one model and one replay buffer: after `--seed-episodes` random episodes of each, taken in
    turn, it collects the tasks in turn, one episode after each C updates, and tests every task.
    The official code collects one episode of every task after each 6 C updates (0c6f7d3
    `scripts/configs.py:199-214`): the same episodes per update.

    After each episode: its file, then its metrics line and TensorBoard points, then the
    checkpoint. A resumed run rolls back to the checkpoint: what was written after it (an episode,
    a metrics line, TensorBoard points) is set aside or dropped, and happens again.
    """

    def __init__(self, config, run_dir, resume=False):
        self.device = resolve_device(config.device)
        # The run's config keeps unset speed paths unset (its config.json), to take the defaults
        # of whichever device resumes it; this process runs with this device's.
        self.saved_config, self.run_dir = config, Path(run_dir)
        self.config = config = config.for_device(self.device)
        set_matmul_precision(self.device, config.tf32)
        set_seed_everywhere(config.seed)
        self.rng = np.random.default_rng(config.seed)  # Seed episodes' random actions.
        self.envs = build_envs(config, config.seed)
        self.test_envs = {}  # By task: worker processes, started at the first test.
        self.model = build_model(config, self.envs[0]).to(self.device).eval()
        self.optimizer = build_optimizer(self.model, config)
        self.gradients = gradient_function(self.model, self.device, config.compile_update,
                                           config.capture_update)
        self.buffer = build_replay(config, self.device, self.envs[0].state_sizes)
        # The batches' dequantisation noise: a stream of its own, apart from torch's global one.
        self.batch_noise = torch.Generator(self.device).manual_seed(derive_seed(config.seed, BATCH_NOISE_TAG))
        self.agent = Agent(self.model, config.planner, config.bit_depth, plan=config.plan(self.device))
        # wall_clock_s: seconds of training (updates, episodes, tests) that the run has kept.
        self.counters = {"episodes": 0, "env_steps": 0, "updates": 0, "test_episodes": 0, "wall_clock_s": 0.0}
        if len(self.envs) > 1:  # Each task's own, the x axis of its curve (plot.py).
            self.counters.update({f"env_steps/{task}": 0 for task in config.tasks})
        if resume:
            self.restore()
        write_json(self.run_dir / "config.json", dataclasses.asdict(self.saved_config))  # --episodes may be new.
        self.wandb = start_wandb(config, self.run_dir) if config.wandb else None  # Before the writer.
        # purge_step hides the TensorBoard points that a killed process logged after the checkpoint.
        self.writer = SummaryWriter(str(self.run_dir),
                                    purge_step=self.counters["env_steps"] + 1 if resume else None)
        if not resume:
            self.writer.add_text("hyperparameters", hyperparameter_table(config))

    # --- Checkpoints. ---

    def save(self):
        state = {
            "config": dataclasses.asdict(self.saved_config), "counters": dict(self.counters),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {**global_rng_state(), "actions": self.rng.bit_generator.state,
                    "replay": self.buffer.rng.bit_generator.state,
                    "batch_noise": self.batch_noise.get_state(), "device": self.device.type,
                    "envs": [pack_random_state(env.get_rng_state()) for env in self.envs]},
        }
        data = io.BytesIO()
        torch.save(state, data)  # In memory first, so that a full disk fails as an OSError below.
        try:
            atomic_write(self.run_dir / CHECKPOINT, lambda f: f.write(data.getbuffer()))
        except OSError as error:
            raise OSError(f"could not write {self.run_dir / CHECKPOINT} ({error.strerror}); the "
                          f"previous checkpoint is intact, resume from it with --resume {self.run_dir}") from None

    def restore(self):
        if not (self.run_dir / CHECKPOINT).exists():  # Killed before the first checkpoint.
            logging.info("%s has no checkpoint yet: starting it over", self.run_dir)
            self._roll_back_files()
            return
        checkpoint = read_checkpoint(self.run_dir, self.config, self.model, self.device)
        load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        # A checkpoint written before wall_clock_s existed counts it from this resume.
        self.counters = {"wall_clock_s": 0.0, **checkpoint["counters"]}
        self._roll_back_files()
        for path in episode_paths(self.run_dir / "episodes" / "train"):
            try:
                self.buffer.add(load_episode(path))
            except Exception as error:  # Truncated, bit rot, foreign file: report and go on.
                logging.warning("skipping unreadable episode %s (%s)", path, type(error).__name__)
        rng = checkpoint["rng"]
        set_global_rng_state(rng)
        self.rng.bit_generator.state = rng["actions"]
        self.buffer.rng.bit_generator.state = rng["replay"]
        if rng.get("device") == self.device.type:
            self.batch_noise.set_state(rng["batch_noise"])
        else:  # Resumed on another kind of device, whose generators have other states.
            updates = self.counters["updates"]
            self.batch_noise.manual_seed(derive_seed(self.config.seed, BATCH_NOISE_TAG, updates))
            reseeded = ["the batch noise"]
            if self.device.type == "cuda":  # Else at the run's seed, or where a CPU run left them.
                torch.cuda.manual_seed_all(derive_seed(self.config.seed, CUDA_RESEED_TAG, updates))
                reseeded.append("the CUDA generators (posterior samples, planning)")
            logging.warning("resumed on %s from a checkpoint written on %s: reseeded %s; the run goes "
                            "on, but its random draws are no longer those of an unbroken run",
                            self.device.type, rng.get("device", "cpu"), " and ".join(reseeded))
        for env, state in zip(self.envs, rng.get("envs") or [rng["env"]]):  # "env": before multi-task runs.
            env.set_rng_state(unpack_random_state(state))
        logging.info("resumed %s after %d episodes, %d env steps, %d updates; %d steps in replay",
                     self.run_dir, self.counters["episodes"], self.counters["env_steps"],
                     self.counters["updates"], self.buffer.steps)

    def _roll_back_files(self):
        """Set aside the episodes and drop the metrics written after the checkpoint."""
        for kind, kept in (("train", self.counters["episodes"]), ("test", self.counters["test_episodes"])):
            for path in episode_paths(self.run_dir / "episodes" / kind):
                if episode_index(path) >= kept:
                    aside = self.run_dir / "episodes" / "discarded" / kind
                    aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, aside / path.name)
                    logging.info("set aside %s: it was written after the checkpoint", path)
        metrics = self.run_dir / "metrics.jsonl"
        write_jsonl(metrics, [r for r in read_jsonl(metrics) if r.get("episodes", 0) <= self.counters["episodes"]])

    # --- The loop. ---

    def train(self):
        config, counters = self.config, self.counters
        progress = EpisodeProgress(config.episodes, counters["episodes"])
        while counters["episodes"] < config.episodes:
            iteration_start = time.perf_counter()
            metrics = {}
            env = self.envs[counters["episodes"] % len(self.envs)]  # The tasks in turn.
            seeding = counters["episodes"] < config.seed_episodes * len(self.envs)
            trains = not seeding
            if trains and self.buffer.chunk_count() == 0:
                # Only an unpadded replay can be empty (`ReplayBuffer`): collecting more would not help.
                longest = max(len(episode["reward"]) for episode in self.buffer.episodes)
                raise NothingToTrainOn(
                    f"no episode of the {counters['episodes']} collected holds a chunk of "
                    f"{self.buffer.chunk_length} steps (the longest has {longest}), and this env's "
                    f"chunks are not padded: train with --chunk-length {longest} or less")
            # play_episode shows the reset frame and one after each decision (the last may be short).
            progress.start(trains, -(-config.max_episode_length // env.action_repeat) + 1)
            start = time.perf_counter()
            if trains:
                metrics = train_model(self.model, self.optimizer, self.buffer, config, self.device,
                                      self.batch_noise, counters["updates"], self.gradients, progress.updated)
                counters["updates"] += config.collect_interval
            update_seconds = time.perf_counter() - start
            if seeding or config.collect == "random":
                policy = random_policy(env.action_size, self.rng)
            else:
                policy = planner_policy(self.agent, config.action_noise)
            start = time.perf_counter()
            episode = play_episode(env, policy, on_frame=progress.stepped)
            episode_seconds = time.perf_counter() - start
            metrics["speed/fps"] = env.steps / episode_seconds
            save_episode(self.run_dir / "episodes" / "train", counters["episodes"], episode)
            self.buffer.add(episode)
            counters["episodes"] += 1
            counters["env_steps"] += env.steps
            metrics["train/return"] = float(episode["reward"].sum())
            if len(self.envs) > 1:
                counters[f"env_steps/{env.task}"] += env.steps
                metrics[f"train/return/{env.task}"] = metrics["train/return"]
            # Every test_interval episodes, and after the last: the paper's final score.
            if counters["episodes"] > config.seed_episodes * len(self.envs) and (
                    counters["episodes"] % config.test_interval == 0 or counters["episodes"] == config.episodes):
                metrics.update(self.test())
            counters["wall_clock_s"] += time.perf_counter() - iteration_start
            self.log(metrics)
            if counters["episodes"] % config.checkpoint_interval == 0 or counters["episodes"] == config.episodes:
                self.save()
            progress.finish(counters["episodes"], {name.split("/")[0]: round(metrics[name], 1) for name in
                                                   ("train/return", "test/return") if name in metrics},
                            update_seconds if trains else 0.0, episode_seconds)
        progress.close()

    def test(self):
        """`--test-episodes` noise-free planner episodes of each task, played in parallel. -> the
        metrics: returns (in a multi-task run each task's, `test/return/<task>`, and their mean)
        and the model's open-loop errors on all of them (`open_loop_errors`); TensorBoard gets each
        task's open-loop prediction and the GIF of its first episode."""
        config, counters = self.config, self.counters
        multi = len(self.envs) > 1
        metrics, episodes = {}, []
        for env in self.envs:
            envs = self.test_envs.get(env.task) or make_parallel_envs(
                env.task, config.test_episodes, env.action_repeat, config.max_episode_length, config.obs,
                env.renders, env.action_size if multi else None)  # From states, frames where the env renders.
            played = test(self.model, envs, config, counters["test_episodes"], self.run_dir)
            counters["test_episodes"] += len(played)
            if multi:  # Workers for one task at a time, not tasks x episodes of them.
                envs.close()
            else:
                self.test_envs[env.task] = envs
            suffix = f"/{env.task}" if multi else ""
            metrics.update(return_metrics(played, suffix))
            image, frames = prediction_media(self.model, played[0], config, env.state_sizes)
            self.writer.add_image("test/open_loop_prediction" + suffix, image, counters["env_steps"])
            if frames is not None:
                add_gif(self.writer, "test/episode" + suffix, episode_mosaic([frames], scale=1), counters["env_steps"])
            episodes += played
        if multi:  # The official code's score: the mean over tasks (0c6f7d3 `define_summaries.py:112`).
            metrics["test/return"] = float(np.mean([metrics[f"test/return/{task}"] for task in config.tasks]))
        # Whether the model can plan yet: open-loop predictions over the planner's horizon.
        errors = open_loop_errors(self.model, episodes, config.horizon, bit_depth=config.bit_depth,
                                  reward_offset=int(config.reward_alignment == "outgoing"))
        metrics.update({f"test/{name}": value for name, value in errors.items()})
        return metrics

    def close(self):
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        for env in [*self.envs, *self.test_envs.values()]:
            env.close()
        self.test_envs = {}

    def log(self, metrics):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, self.counters["env_steps"])
        self.writer.flush()
        append_jsonl(self.run_dir / "metrics.jsonl", {**self.counters, **metrics})


def warn_if_days(workspace):
    """On a CPU, say once, before training, when the settings given will take more than a day: the
    paper's take weeks there. The settings stay as they are."""
    from bench import project_run  # bench.py imports this module.
    config, counters = workspace.config, workspace.counters
    episodes_left = config.episodes - max(counters["episodes"], config.seed_episodes * len(config.tasks))
    if episodes_left <= 0:
        return
    per_episode, total, parts = project_run(config, workspace.model, workspace.envs[0], episodes_left,
                                            workspace.device)
    if total > DAY:
        logging.warning(
            "on this CPU one episode will take about %.0f min (%d updates of %.1f s and %d planning "
            "calls of %.2f s, timed just now) and the %d episodes left about %.1f days, tests included. "
            "A GPU takes hours; on a CPU, --preset small learns cartpole-swingup in about 3 hours on 2 cores "
            "(docs/results.md, Learning on a CPU). Training goes on with the settings given.",
            per_episode / 60, config.collect_interval, parts["update"], parts["decisions"], parts["plan"],
            episodes_left, total / DAY)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl set one.
    keep_freed_memory()
    config, run_dir, resume = parse_args(argv)
    try:
        run_dir = Path(run_dir) if run_dir else make_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        workspace = Workspace(config, run_dir, resume=resume)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    if workspace.counters["episodes"] >= config.episodes:
        logging.info("%s already has %d episodes; raise --episodes to train longer",
                     run_dir, workspace.counters["episodes"])
        workspace.close()
        return
    logging.info("run directory: %s (device %s; speed paths: %s)", run_dir, workspace.device,
                 ", ".join(workspace.config.speed_paths()) or "none")
    if workspace.device.type == "cpu":
        warn_if_days(workspace)
    try:
        workspace.train()
    except (FloatingPointError, OSError, NothingToTrainOn) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; continue with: python train.py --resume {run_dir}")
    finally:
        workspace.close()
    logging.info("done: %s", run_dir)


if __name__ == "__main__":
    main()
