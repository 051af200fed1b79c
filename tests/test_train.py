"""Flag parsing and the update step of train.py, in process."""
import dataclasses
import inspect

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, make_episode

TINY_ARGS = [arg for name, value in TINY_MODEL.items() for arg in ("--" + name.replace("_", "-"), str(value))]
from model import WorldModel
from config import PRESETS, Config, parse_args
from logger import EpisodeProgress
from runs import build_replay
from train import Workspace, update, warn_if_days
from utils import BatchPrefetcher, ReplayBuffer, write_json


def test_defaults_are_the_papers():
    config, run_dir, resume = parse_args([])
    assert run_dir is None and resume is False
    assert (config.task, config.action_repeat, config.episodes, config.seed_episodes) == ("cheetah-run", 4, 1000, 5)
    assert (config.collect_interval, config.batch_size, config.chunk_length) == (100, 50, 50)
    assert (config.horizon, config.iterations, config.candidates, config.top_candidates) == (12, 10, 1000, 100)
    assert (config.action_noise, config.free_nats, config.reward_scale, config.bit_depth) == (0.3, 3.0, 10.0, 5)
    assert (config.learning_rate, config.adam_epsilon, config.grad_clip_norm) == (1e-3, 1e-4, 1000.0)
    assert (config.belief_size, config.state_size, config.hidden_size) == (200, 30, 200)
    assert parse_args(["--task", "walker-walk"])[0].action_repeat == 2


def test_run_dir_is_new_or_refused(tmp_path, capsys):
    assert parse_args(["--run-dir", str(tmp_path / "a")])[1:] == (str(tmp_path / "a"), False)
    (tmp_path / "config.json").write_text("{}")
    for argv in (["--run-dir", str(tmp_path)], ["--run-dir", "x", "--resume", str(tmp_path)]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert "continue it with --resume" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--test-interval", "--checkpoint-interval", "--collect-interval",
                                  "--test-episodes", "--seed-episodes", "--candidates"])
def test_zero_counts_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_learning_rate_warms_up_linearly_over_the_official_ramp():
    config = Config(batch_size=2, chunk_length=4, warmup_updates=200, **TINY_MODEL)
    model = WorldModel(2, **TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_epsilon)
    buffer = ReplayBuffer(4)
    buffer.add(make_episode(0, 10))
    batches = BatchPrefetcher(buffer, config.batch_size, count=1, device="cpu")
    for step, expected in ((0, 0.0), (50, 2.5e-4), (100, 5e-4), (200, 1e-3), (5000, 1e-3)):
        update(model, optimizer, batches.batch(), config, step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    config.warmup_updates = 0
    update(model, optimizer, batches.batch(), config, 0)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_preset_sets_its_values_and_flags_win(caplog):
    with caplog.at_level("INFO"):
        config, _, _ = parse_args(["--task", "cartpole-swingup", "--preset", "small", "--candidates", "300"])
    expected = {**PRESETS["small"], "candidates": 300}
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.preset == "small"
    assert (config.horizon, config.chunk_length, config.belief_size) == (12, 50, 200)  # Untouched.
    assert "preset small: batch_size=16" in caplog.text and "overridden by flags: candidates" in caplog.text


def test_camera_ready_preset_is_commit_0c6f7d3_by_task(caplog):
    """`--preset camera-ready` sets the camera-ready value of every item with a flag; cup-catch's
    action repeat 6 (166 decisions: 996 physics steps) only on cup-catch; it stacks after `small`."""
    with caplog.at_level("INFO"):
        cup, _, _ = parse_args(["--task", "cup-catch", "--preset", "camera-ready"])
    expected = {"state_heads": "loss", "reward_layers": 2, "reward_hidden_size": 100, "planner_discount": 0.99,
                "reward_alignment": "outgoing", "gru_cell": "block", "init": "glorot", "action_repeat": 6,
                "max_episode_length": 996}
    assert {name: getattr(cup, name) for name in expected} == expected
    assert cup.planner["discount"] == 0.99
    assert "preset camera-ready: state_heads=loss" in caplog.text and "action_repeat=6" in caplog.text
    both, _, _ = parse_args(["--task", "cartpole-swingup", "--preset", "small,camera-ready", "--planner-discount", "1"])
    assert (both.action_repeat, both.max_episode_length, both.batch_size, both.cnn_depth) == (8, 1000, 16, 16)
    assert (both.state_heads, both.planner_discount, both.reward_layers) == ("loss", 1.0, 2)
    default, _, _ = parse_args(["--task", "cup-catch"])
    assert (default.action_repeat, default.state_heads, default.reward_alignment) == (4, "none", "incoming")


def test_presets_in_a_multitask_run_leave_each_task_its_own(caplog):
    """camera-ready's cup-catch repeat and its state heads do not apply to a multi-task run, which
    has none (the official code's); the rest does, and it says so."""
    with caplog.at_level("INFO"):
        config, _, _ = parse_args(["--task", "all", "--preset", "small,camera-ready"])
    assert (config.action_repeat, config.max_episode_length, config.state_heads) == (0, 1000, "none")
    assert config.repeat_of("cup-catch") == 4 and config.repeat_of("walker-walk") == 2
    assert (config.reward_alignment, config.planner_discount, config.gru_cell, config.batch_size) == \
        ("outgoing", 0.99, "block", 16)
    assert "each task keeps its own action_repeat, max_episode_length" in caplog.text
    assert "a multi-task run has no state heads" in caplog.text


@pytest.mark.parametrize("flag, value", [("--state-heads", "some"), ("--reward-alignment", "next"),
                                         ("--planner-discount", "0"), ("--planner-discount", "1.5")])
def test_bad_camera_ready_options_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value])
    assert exit_info.value.code == 2 and f"{flag} must be" in capsys.readouterr().err


@pytest.mark.parametrize("alignment", ["incoming", "outgoing"])
def test_update_gives_the_loss_the_aligned_chunks_and_states(alignment, monkeypatch):
    """The replay's chunks of L (+ 1 for outgoing rewards) steps reach the loss as L steps, aligned
    as `outgoing_reward_chunks` makes them, with the states by key: two of one size, in an order
    that is not alphabetical, so that a sort anywhere would swap their targets unseen."""
    sizes = {"velocity": 3, "position": 3}
    config = Config(batch_size=3, chunk_length=4, reward_alignment=alignment, state_heads="loss", **TINY_MODEL)
    model = WorldModel(2, **TINY_MODEL, state_heads="loss", state_sizes=sizes)
    episode = make_episode(1, 10)  # Its reward at step t is t.
    step = np.arange(11, dtype=np.float32)[:, None].repeat(3, 1)
    episode["state_velocity"], episode["state_position"] = 100 + step, -1 - step  # Told apart.
    buffer = build_replay(config, "cpu", sizes)
    buffer.add(episode)
    batch = BatchPrefetcher(buffer, config.batch_size, count=1, device="cpu").batch()
    seen = {}

    def loss(*args):
        seen.update(inspect.signature(WorldModel.loss).bind(model, *args).arguments)
        return WorldModel.loss(model, *args)

    monkeypatch.setattr(model, "loss", loss)
    update(model, torch.optim.Adam(model.parameters()), batch, config, step=0)
    obs, actions, rewards, *states = batch
    if alignment == "outgoing":
        assert len(obs) == 5
        obs, rewards, states = obs[:-1], rewards[1:], [state[:-1] for state in states]
        actions = torch.cat([0 * actions[:1], actions[1:-1]])
    for name, expected in (("obs", obs), ("actions", actions), ("rewards", rewards)):
        torch.testing.assert_close(seen[name], expected, rtol=0, atol=0)
    assert list(seen["states"]) == ["velocity", "position"]
    for key, state in zip(sizes, states):
        torch.testing.assert_close(seen["states"][key], state, rtol=0, atol=0)
    stored_step = seen["rewards"] - float(alignment == "outgoing")  # An outgoing reward is of t + 1.
    torch.testing.assert_close(seen["states"]["velocity"], 100 + stored_step[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(seen["states"]["position"], -1 - stored_step[..., None].expand(-1, -1, 3))


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--preset", "tiny"])
    assert exit_info.value.code == 2
    assert "unknown --preset tiny; known presets: small, small-state, camera-ready" in capsys.readouterr().err


def test_resume_keeps_the_preset(tmp_path, capsys):
    config, _, _ = parse_args(["--task", "cartpole-swingup", "--preset", "small", "--batch-size", "8"])
    write_json(tmp_path / "config.json", dataclasses.asdict(config))
    resumed, _, _ = parse_args(["--resume", str(tmp_path), "--episodes", "50"])
    assert resumed == dataclasses.replace(config, episodes=50)
    assert parse_args(["--resume", str(tmp_path), "--preset", "small"])[0].batch_size == 8
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path), "--preset", ""])
    assert "--preset  (the run has small)" in capsys.readouterr().err


@pytest.mark.parametrize("clip", [0.05, 1e9])
def test_gradient_is_clipped_to_the_configured_global_norm(clip):
    """With SGD at learning rate 1 the step is minus the gradient that the update applied: its
    global norm is the configured clip when the raw gradient is longer, and the raw one if not."""
    config = Config(batch_size=2, chunk_length=4, warmup_updates=0, learning_rate=1.0,
                    grad_clip_norm=clip, **TINY_MODEL)
    model = WorldModel(2, **TINY_MODEL)
    buffer = ReplayBuffer(4)
    buffer.add(make_episode(0, 10))
    batch = BatchPrefetcher(buffer, config.batch_size, count=1, device="cpu").batch()
    before = [p.detach().clone() for p in model.parameters()]
    terms = update(model, torch.optim.SGD(model.parameters()), batch, config, step=0)
    step = torch.cat([(old - new).flatten() for old, new in zip(before, model.parameters())])
    assert terms["grad_norm"] > 1, "the raw gradient is longer than the small clip"
    expected = min(clip, terms["grad_norm"].item())
    assert step.norm().item() == pytest.approx(expected, rel=1e-4)


def test_overshooting_distance_one_is_refused(capsys):
    """d = 1 is the loss's one-step KL: a distance of 1 would overshoot nothing."""
    assert parse_args(["--overshooting-distance", "2"])[0].overshooting_distance == 2
    for distance in ("1", "-3"):
        with pytest.raises(SystemExit):
            parse_args(["--overshooting-distance", distance])
        assert "--overshooting-distance must be 0 (off) or at least 2" in capsys.readouterr().err


def test_official_gru_and_init_are_options(capsys):
    config = parse_args(["--gru-cell", "block", "--init", "glorot"])[0]
    assert (config.gru_cell, config.init) == ("block", "glorot")
    assert (Config().gru_cell, Config().init) == ("torch", "torch")
    for flag, value, message in (("--gru-cell", "lstm", "--gru-cell must be one of torch, block"),
                                 ("--init", "orthogonal", "--init must be one of torch, glorot")):
        with pytest.raises(SystemExit):
            parse_args([flag, value])
        assert message in capsys.readouterr().err


def test_loss_options_are_checked(capsys):
    config = parse_args(["--overshooting-distance", "50", "--overshooting-reward-scale", "100",
                         "--global-kl-beta", "0.1"])[0]
    assert (config.overshooting_reward_scale, config.global_kl_beta) == (100.0, 0.1)
    assert (Config().overshooting_reward_scale, Config().global_kl_beta) == (0.0, 0.0)
    for argv, message in ((["--overshooting-reward-scale", "100"], "needs --overshooting-distance"),
                          (["--global-kl-beta", "-1"], "must be at least 0")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_progress_moves_inside_an_iteration(capsys):
    """The bar moves with each update (its share of the iteration's time, a half until measured)
    and each step of the episode, shows which, and ends each episode at its count exactly; a seed
    episode's steps carry the whole episode."""
    progress = EpisodeProgress(total=10, done=2)
    progress.start(with_updates=True, steps_per_episode=5)  # 4 decisions and the reset frame.
    for done in range(1, 5):
        progress.updated(done, 4)
    assert progress.bar.n == pytest.approx(2.5) and progress.bar.postfix == "update=4/4"
    for _ in range(6):  # A frame past the expected ones moves nothing.
        progress.stepped(None)
    assert progress.bar.n == pytest.approx(3.0) and progress.bar.postfix == "step=4/4"
    progress.finish(3, {"train": 1.0}, update_seconds=3.0, episode_seconds=1.0)
    assert progress.bar.postfix == "train=1"
    assert progress.bar.n == 3 and progress.share == 0.75
    progress.start(with_updates=True, steps_per_episode=5)
    progress.updated(1, 1)
    assert progress.bar.n == pytest.approx(3.75)
    progress.finish(4, {})
    progress.start(with_updates=False, steps_per_episode=5)
    for _ in range(5):
        progress.stepped(None)
    assert progress.bar.n == pytest.approx(5.0)
    # Up to the last episode: fractions of an episode that add up to a hair past the total stop
    # at it (tqdm warns and clamps otherwise).
    progress.finish(9, {})
    progress.start(with_updates=True, steps_per_episode=7)
    for done in range(1, 8):
        progress.updated(done, 7)
    for _ in range(7):
        progress.stepped(None)
    assert progress.bar.n <= progress.bar.total
    progress.close()
    err = capsys.readouterr().err
    assert "TqdmWarning" not in err
    # Into a file, not a terminal: a line per 30 s, not one per update and step.
    assert progress.bar.mininterval == 30 and err.count("\r") < 10


@pytest.mark.parametrize("episodes", [10, 10_000_000])
def test_a_cpu_run_of_days_is_announced_and_left_as_given(episodes, tmp_path, caplog):
    """Before training on a CPU: a projection from one update and one planning call timed on a copy
    of the model, a warning when it comes to more than a day, with the suggestion of the small
    preset; the model, torch's random state and the config stay as they were."""
    config, _, _ = parse_args(["--task", "cartpole-swingup", "--episodes", str(episodes), "--device", "cpu",
                               "--run-dir", str(tmp_path / "run")] + TINY_ARGS)
    (tmp_path / "run").mkdir()
    workspace = Workspace(config, tmp_path / "run")
    weights = {name: value.clone() for name, value in workspace.model.state_dict().items()}
    random_state = torch.random.get_rng_state()
    with caplog.at_level("WARNING"):
        warn_if_days(workspace)
    workspace.close()
    warned = "days, tests included" in caplog.text and "--preset small" in caplog.text
    assert warned == (episodes > 10)
    if warned:
        assert "125 planning calls" in caplog.text and f"the {episodes - 5} episodes left" in caplog.text
    assert torch.equal(torch.random.get_rng_state(), random_state)
    for name, value in workspace.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert workspace.saved_config == config and workspace.config == config.for_device("cpu")
