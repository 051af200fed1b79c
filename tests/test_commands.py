"""The three commands end to end, as a user runs them: subprocesses, the real env, files on disk."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY_FLAGS


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_clean_error(result, message):
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("log")
    run("train.py", *TINY_FLAGS, "--log-dir", str(log_dir))
    (run_dir,) = (log_dir / "cartpole-swingup").iterdir()
    return run_dir


def test_train_writes_the_run_directory(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "cartpole-swingup" and config["action_repeat"] == 8
    assert config["belief_size"] == 16 and config["candidates"] == 16
    # 200 env steps with repeat 8: 25 decisions, stored as 26 aligned frames.
    train_episodes = sorted((run_dir / "episodes" / "train").glob("*.npz"))
    assert [p.name for p in train_episodes] == [f"{i:06d}-25.npz" for i in range(4)]
    with np.load(train_episodes[-1]) as episode:
        assert episode["obs"].shape == (26, 3, 64, 64) and episode["obs"].dtype == np.uint8
        assert episode["action"].shape == (26, 1) and (episode["action"][0] == 0).all()
        assert episode["reward"][0] == 0
    # --test-interval 2 with 2 seed episodes: one test, after episode 4, of --test-episodes 2.
    assert len(list((run_dir / "episodes" / "test").glob("*.npz"))) == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["episodes"] for m in metrics] == [1, 2, 3, 4]
    assert [m["env_steps"] for m in metrics] == [200, 400, 600, 800]
    assert [m["updates"] for m in metrics] == [0, 0, 3, 6]
    assert "loss/kl" in metrics[2] and "test/return" in metrics[3]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    counters = checkpoint["counters"]
    assert (counters["episodes"], counters["env_steps"], counters["updates"]) == (4, 800, 6)
    assert checkpoint["optimizer"]["state"], "Adam moments are saved"
    assert "rssm.gru.weight_hh" in checkpoint["model"]


def test_train_logs_tensorboard(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/image", "loss/reward", "loss/kl", "loss/kl_free", "loss/total", "train/grad_norm",
            "train/return", "test/return", "test/return_std", "speed/updates_per_s",
            "speed/fps"} <= scalars
    assert [e.step for e in events.Scalars("train/return")] == [200, 400, 600, 800]
    assert [e.step for e in events.Scalars("test/return")] == [800]
    assert events.Tags()["images"] == ["test/open_loop_prediction"]
    assert any("hyperparameters" in tag for tag in events.Tags()["tensors"])


def test_test_command_plays_episodes(run_dir):
    result = run("test.py", str(run_dir), "--episodes", "2", "--device", "cpu")
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["episode 1", "episode 2"]
    returns = [float(line.split("return")[1]) for line in lines[:2]]
    mean, std = (float(x) for x in lines[2].split()[2:5:2])
    assert lines[2].startswith("mean return") and lines[2].endswith("over 2 episodes")
    assert mean == pytest.approx(np.mean(returns), abs=0.1) and std == pytest.approx(np.std(returns), abs=0.1)


def test_test_command_plays_random_actions_on_the_same_episodes(run_dir, tmp_path):
    config_only = tmp_path / "run"  # The baseline needs the run's config, not its checkpoint.
    config_only.mkdir()
    shutil.copy(run_dir / "config.json", config_only)
    results = [run("test.py", str(path), "--episodes", "2", "--random").stdout
               for path in (run_dir, config_only)]
    assert results[0] == results[1] and results[0].strip().splitlines()[2].endswith("over 2 episodes")
    planned = run("test.py", str(run_dir), "--episodes", "2", "--device", "cpu").stdout
    assert planned != results[0]


def test_render_without_a_display_is_refused(run_dir):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "test.py", str(run_dir), "--render", "--episodes", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert_clean_error(result, "--render needs a display")


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb (installed by .ci/run)")
def test_render_shows_the_episode_in_a_window(run_dir):
    display = ":93"
    server = subprocess.Popen(["Xvfb", display, "-screen", "0", "800x600x24"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket = Path("/tmp/.X11-unix/X93")
    for _ in range(100):  # Wait up to 10 s for the X server to listen.
        if socket.exists():
            break
        time.sleep(0.1)
    try:
        result = subprocess.run([sys.executable, "test.py", str(run_dir), "--render", "--episodes", "1"],
                                cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "DISPLAY": display})
        assert result.returncode == 0, result.stderr
        assert "mean return" in result.stdout
    finally:
        server.terminate()
        server.wait()


def test_video_prediction_writes_a_video(run_dir, tmp_path):
    out = tmp_path / "prediction.mp4"
    result = run("video_prediction.py", str(run_dir), "--out", str(out), "--context", "5", "--length", "15")
    assert result.stdout.strip() == str(out)
    video = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 20 and frames[0].shape == (256, 768, 3)
    # Ground truth, prediction and difference panels differ (the tiny model predicts badly).
    assert not np.array_equal(frames[-1][:, :256], frames[-1][:, 256:512])


def test_video_prediction_from_a_stored_episode(run_dir, tmp_path):
    episode = sorted((run_dir / "episodes" / "train").glob("*.npz"))[0]
    out = tmp_path / "stored.mp4"
    run("video_prediction.py", str(run_dir), "--episode", str(episode), "--out", str(out), "--length", "20")
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT) == 25


def test_video_prediction_writes_a_gif(run_dir, tmp_path):
    episode = sorted((run_dir / "episodes" / "train").glob("*.npz"))[0]
    out = tmp_path / "stored.gif"
    run("video_prediction.py", str(run_dir), "--episode", str(episode), "--out", str(out), "--length", "10", "--gif")
    with Image.open(out) as gif:
        assert (gif.n_frames, gif.size, gif.info["loop"]) == (15, (384, 128), 0)


def test_unknown_task_lists_the_tasks(tmp_path):
    result = run("train.py", "--task", "cartpole-juggle", "--log-dir", str(tmp_path), check=False)
    assert_clean_error(result, "unknown task 'cartpole-juggle'")
    assert "cartpole-swingup" in result.stderr and "walker-walk" in result.stderr
    assert not list(tmp_path.iterdir()), "no run directory for a run that never started"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    result = run("train.py", "--device", "cuda", "--log-dir", str(tmp_path), check=False)
    assert_clean_error(result, "no CUDA GPU is available")


@pytest.mark.parametrize("script", ["test.py", "video_prediction.py"])
def test_bad_run_directories(script, run_dir, tmp_path):
    assert_clean_error(run(script, str(tmp_path), check=False), "has no config.json")
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(run_dir / "config.json", no_checkpoint)
    assert_clean_error(run(script, str(no_checkpoint), check=False), "has no checkpoint.pt")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt)
    data = (corrupt / "checkpoint.pt").read_bytes()
    (corrupt / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert_clean_error(run(script, str(corrupt), check=False), "checkpoint.pt is unreadable")
    other_size = tmp_path / "other_size"
    shutil.copytree(run_dir, other_size)
    config = json.loads((other_size / "config.json").read_text())
    config["belief_size"] = 32
    (other_size / "config.json").write_text(json.dumps(config))
    assert_clean_error(run(script, str(other_size), check=False), "does not match the model")


@pytest.mark.parametrize("variant", ["ssm", "gru"])
def test_each_model_variant_trains_resumes_tests_and_predicts(variant, tmp_path):
    """The designs of Figure 4 through the same commands, latent overshooting on; `rssm` is the
    run of the tests above."""
    run_dir = tmp_path / variant
    flags = [*TINY_FLAGS, "--model", variant, "--overshooting-distance", "3"]
    run("train.py", *flags, "--episodes", "3", "--run-dir", str(run_dir))
    run("train.py", "--resume", str(run_dir), "--episodes", "4")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["episodes"] for m in metrics] == [1, 2, 3, 4] and "test/return" in metrics[-1]
    assert metrics[-1]["loss/overshooting_kl"] >= 0
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["model"] == variant
    assert ("rssm.gru.weight_hh" in checkpoint["model"]) == (variant == "gru")
    assert "mean return" in run("test.py", str(run_dir), "--episodes", "1", "--device", "cpu").stdout
    out = tmp_path / "prediction.gif"
    run("video_prediction.py", str(run_dir), "--out", str(out), "--length", "10", "--gif")
    assert out.stat().st_size > 0
    refused = run("train.py", "--resume", str(run_dir), "--model", "rssm", check=False)
    assert_clean_error(refused, "a resumed run keeps its config")


def test_random_collection_never_plans_after_the_seed_episodes(tmp_path):
    """`--collect random`: every training episode's actions are the next draws of the run's uniform
    stream (seed episodes and all), while the model trains and the test still plans."""
    run_dir = tmp_path / "random"
    run("train.py", *TINY_FLAGS, "--collect", "random", "--run-dir", str(run_dir))
    config = json.loads((run_dir / "config.json").read_text())
    rng = np.random.default_rng(config["seed"])
    for path in sorted((run_dir / "episodes" / "train").glob("*.npz")):
        with np.load(path) as episode:
            actions = episode["action"][1:]
        expected = np.stack([rng.uniform(-1, 1, actions.shape[1]) for _ in actions]).astype(np.float32)
        np.testing.assert_array_equal(actions, expected)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["updates"] == 6 and "test/return" in metrics[-1]


def test_unknown_model_or_collection_is_refused(tmp_path):
    assert_clean_error(run("train.py", "--model", "lstm", "--log-dir", str(tmp_path), check=False),
                       "--model must be one of rssm, ssm, gru")
    assert_clean_error(run("train.py", "--collect", "human", "--log-dir", str(tmp_path), check=False),
                       "--collect must be planner or random")
