"""Learning from states (`--obs state`): the observation vectors of dm_control and Gymnasium envs,
the MLP encoder and decoder, and every command end to end on real envs."""
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from dm_control import suite
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_FLAGS
from model import VectorEncoder, VectorObservationModel, WorldModel
from test_commands import assert_clean_error, run
from utils import BatchPrefetcher, DeviceReplayBuffer, ReplayBuffer, episode_paths, load_episode
from wrappers import flatten_state, make_env, state_labels

RECORDER = "gym:tests.gym_envs:PlanetTest/Recorder-v0"
NO_RENDER = "gym:tests.gym_envs:PlanetTest/NoRender-v0"
STATE_DIAGNOSTICS = ["test/observation_mse_open_loop", "test/observation_mse_constant"]


def state_flags(task="cartpole-swingup", *extra):
    flags = TINY_FLAGS.copy()
    flags[flags.index("--task") + 1] = task
    return [*flags, "--obs", "state", "--embed-size", "16", *extra]


def test_dm_control_state_is_the_observation_dict_flattened_in_its_key_order():
    """walker's dict is orientations (14), height (a scalar), velocity (9): not sorted by name."""
    env = make_env("walker-walk", seed=4, action_repeat=2, max_episode_length=20, obs="state")
    reference = suite.load("walker", "walk", task_kwargs={"random": 4})

    def expected(time_step):
        return np.concatenate([np.asarray(value, np.float32).reshape(-1) for value in time_step.observation.values()])

    obs, info = env.reset()
    time_step = reference.reset()
    assert list(time_step.observation) == ["orientations", "height", "velocity"]
    assert env.observation_space.shape == (24,) and obs.dtype == np.float32 and "frame" not in info
    np.testing.assert_array_equal(obs, expected(time_step))
    assert state_labels(env.state_sizes)[12:16] == ["orientations[12]", "orientations[13]", "height[0]", "velocity[0]"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = rng.uniform(-1, 1, env.action_size).astype(np.float32)
        obs, *_ = env.step(action)
        for _ in range(2):  # The action repeat.
            time_step = reference.step(action)
        np.testing.assert_array_equal(obs, expected(time_step))
    env.close()


def test_flatten_state_keeps_the_dicts_order():
    state = {"velocity": np.array([1.0, 2.0], np.float32), "height": np.array([3.0], np.float32)}
    np.testing.assert_array_equal(flatten_state(state), [1.0, 2.0, 3.0])
    assert state_labels({"velocity": 2, "height": 1}) == ["velocity[0]", "velocity[1]", "height[0]"]


def test_gym_state_is_the_envs_own_observation_with_frames_on_request():
    env = make_env(RECORDER, seed=3, action_repeat=3, obs="state", frames=True)
    obs, info = env.reset()
    start = obs[1]
    np.testing.assert_array_equal(obs, [0.0, start])
    assert info["frame"].shape == (3, 64, 64) and (info["frame"] == 0).all()
    obs, reward, *_, info = env.step(np.zeros(2, np.float32))
    np.testing.assert_array_equal(obs, [3.0, start])  # After 3 env steps, the env's own vector.
    assert reward == 1 + 2 + 3 and (info["frame"] == 30).all()
    env.close()


def test_an_env_that_cannot_render_is_seen_from_states_without_frames():
    env = make_env(NO_RENDER, obs="state")
    assert not env.renders and env.reset()[0].shape == (2,)
    env.close()
    with pytest.raises(ValueError, match="renders no rgb_array frames"):
        make_env(NO_RENDER, obs="state", frames=True)


def test_vector_models_are_kaixhins_symbolic_mlps():
    """Two hidden ReLU layers of the embed size each (Kaixhin/PlaNet `SymbolicEncoder`,
    `SymbolicObservationModel`): 17 -> 1024 -> 1024 -> 1024, and 230 -> 1024 -> 1024 -> 17."""
    encoder, decoder = VectorEncoder(17), VectorObservationModel(230, 17)
    linear = [(m.in_features, m.out_features) for m in encoder.net if isinstance(m, torch.nn.Linear)]
    assert linear == [(17, 1024), (1024, 1024), (1024, 1024)] and encoder.embed_size == 1024
    linear = [(m.in_features, m.out_features) for m in decoder.net if isinstance(m, torch.nn.Linear)]
    assert linear == [(230, 1024), (1024, 1024), (1024, 17)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in (*encoder.net, *decoder.net)) == 4
    model = WorldModel(6, obs_size=17)
    assert model.rssm.fc_posterior_hidden.in_features == 200 + 1024
    assert model.encoder(torch.zeros(5, 2, 17)).shape == (5, 2, 1024)
    assert model.predict_open_loop(torch.zeros(5, 2, 17), torch.zeros(5, 2, 6), 2).shape == (5, 2, 17)


def test_state_replay_keeps_the_vectors_as_they_are():
    """Float vectors go through both replays and the prefetcher unchanged: no bit depth, no noise."""
    rng = np.random.default_rng(0)
    episode = {"obs": rng.normal(size=(12, 5)).astype(np.float32), "action": np.zeros((12, 1), np.float32),
               "reward": np.zeros(12, np.float32)}
    for buffer in (ReplayBuffer(12, seed=0), DeviceReplayBuffer(12, seed=0)):
        buffer.add(episode)
        obs, *_ = next(iter(BatchPrefetcher(buffer, 2, 1, "cpu", 5, torch.Generator().manual_seed(0))))
        assert obs.dtype == torch.float32
        np.testing.assert_array_equal(obs.numpy(), np.stack([episode["obs"]] * 2, axis=1))


@pytest.fixture(scope="module")
def state_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("state") / "run"
    run("train.py", *state_flags(), "--episodes", "3", "--run-dir", str(run_dir))
    run("train.py", "--resume", str(run_dir), "--episodes", "4")
    return run_dir


def test_a_dm_control_run_from_states_trains_resumes_and_logs(state_run):
    records = [json.loads(line) for line in (state_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in records] == [1, 2, 3, 4] and records[-1]["updates"] == 6
    assert "loss/observation" in records[-1] and "loss/image" not in records[-1]
    assert all(np.isfinite(records[-1][name]) for name in STATE_DIAGNOSTICS)
    assert not any("image" in name for name in records[-1])
    with np.load(episode_paths(state_run / "episodes" / "train")[0]) as episode:
        assert episode["obs"].shape == (26, 5) and episode["obs"].dtype == np.float32
        assert "frame" not in episode  # Training renders nothing.
        np.testing.assert_array_equal(episode["obs"], np.concatenate(
            [episode["state_position"], episode["state_velocity"]], axis=1))
    test_episode = load_episode(episode_paths(state_run / "episodes" / "test")[0])
    assert test_episode["frame"].shape == (26, 3, 64, 64)  # Tests render, for TensorBoard's GIF.
    events = EventAccumulator(str(state_run), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["test/episode", "test/open_loop_prediction"]
    plot = events.Images("test/open_loop_prediction")[-1]  # Of the tests after episodes 3 and 4.
    assert Image.open(io.BytesIO(plot.encoded_image_string)).size[0] > 500  # The plot, not a strip.


def test_resuming_a_state_run_from_pixels_is_refused(state_run):
    result = run("train.py", "--resume", str(state_run), "--obs", "pixels", check=False)
    assert result.returncode == 2 and "--obs pixels (the run has state)" in result.stderr


def test_test_and_video_prediction_from_states(state_run, tmp_path):
    out = run("test.py", str(state_run), "--episodes", "2", "--device", "cpu", "--video",
              "--out", str(tmp_path / "test.mp4")).stdout
    assert "mean return" in out and (tmp_path / "test.mp4").stat().st_size > 0
    capture = cv2.VideoCapture(str(tmp_path / "test.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 26  # Every step of the episodes, rendered.
    lines = run("video_prediction.py", str(state_run), "--context", "2", "--length", "5", "--device", "cpu",
                "--plot", str(tmp_path / "plot.png"), "--out", str(tmp_path / "video.mp4")).stdout.split()
    assert lines == [str(tmp_path / "plot.png"), str(tmp_path / "video.mp4")]
    plot = cv2.imread(str(tmp_path / "plot.png"))
    assert plot.shape[0] > 200 and plot.shape[1] > 500
    capture = cv2.VideoCapture(str(tmp_path / "video.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 7


def test_an_env_without_frames_trains_from_states_and_says_what_it_cannot_show(tmp_path):
    """A Gymnasium env from states, end to end (test_sweep trains Pendulum from states too).
    NoRender-v0 terminates at env step 7: with action repeat 1, 8 stored steps, chunks of 4."""
    run_dir = tmp_path / "run"
    flags = state_flags(NO_RENDER, "--action-repeat", "1", "--chunk-length", "4")
    run("train.py", *flags, "--run-dir", str(run_dir))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["updates"] == 6 and "test/return" in records[-1]
    assert "mean return" in run("test.py", str(run_dir), "--episodes", "2", "--device", "cpu").stdout
    assert_clean_error(run("test.py", str(run_dir), "--video", "--device", "cpu", check=False),
                       "renders no rgb_array frames")
    result = run("video_prediction.py", str(run_dir), "--context", "2", "--length", "3", "--device", "cpu")
    assert [Path(line).name for line in result.stdout.split()] == ["state_prediction.png"]
    assert "no video" in result.stderr


def test_an_observation_that_is_not_a_flat_box_is_refused_from_states():
    result = run("train.py", "--task", "gym:tests.gym_envs:PlanetTest/ImageObservation-v0", "--obs", "state",
                 check=False)
    assert result.returncode == 2 and "--obs state needs a flat Box" in result.stderr
    assert "Traceback" not in result.stderr
