"""The three commands end to end, as a user runs them: subprocesses, the real env, files on disk.
Where a test must see what a command played or drew, it runs the command's `main` in this process."""
import functools
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import logger
import runs  # Not `from runs import test_seeds`, which pytest would collect as a test.
import test as test_script  # The repository's test.py: conftest puts the repository first on the path.
import video_prediction
from agent import play_episode, play_episodes
from config import Config
from conftest import ROOT, TINY_FLAGS
from utils import episode_paths, load_episode
from wrappers import make_env

RUN_SEED = 3  # Of the module's run: not train.py's default, so that a default of 0 shows.
DIAGNOSTICS = ["test/reward_mse_open_loop", "test/reward_mse_posterior", "test/reward_mse_constant",
               "test/image_mse_open_loop", "test/image_mse_constant"]


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_clean_error(result, message):
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def run_in_process(monkeypatch, script, *args):
    """`python SCRIPT ARGS` in this process, without autograd as its `__main__` runs it, and without
    its set-up of the process's logging and malloc, which would outlive the test."""
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setattr(script, "keep_freed_memory", lambda: None)
    with torch.no_grad():
        script.main([str(arg) for arg in args])


def play_test(monkeypatch, capsys, *args):
    """`python test.py ARGS` in this process -> the episodes that each round of parallel envs
    played, and the returns that test.py printed."""
    rounds = []

    def recorded(*arguments):
        rounds.append(play_episodes(*arguments))
        return rounds[-1]

    monkeypatch.setattr(test_script, "play_episodes", recorded)
    run_in_process(monkeypatch, test_script, *args)
    lines = capsys.readouterr().out.splitlines()
    return rounds, [float(line.split("return ")[1]) for line in lines if line.startswith("episode ")]


def first_test(run_dir):
    """The episodes of the run's first (and only) test: 2 episodes of test_seeds(RUN_SEED, 0, 2)."""
    return [load_episode(path) for path in episode_paths(run_dir / "episodes" / "test")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("log")
    run("train.py", *TINY_FLAGS, "--seed", str(RUN_SEED), "--log-dir", str(log_dir))
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
    # The test's diagnostics of the model's open-loop predictions, with the test's line only.
    assert [[name in m for name in DIAGNOSTICS] for m in metrics] == [[False] * 5] * 3 + [[True] * 5]
    assert all(np.isfinite(metrics[3][name]) and metrics[3][name] > 0 for name in DIAGNOSTICS)
    # reward_mse_constant is the variance of the rewards they target: --horizon 3 steps after
    # every fourth step of the test's episodes, as README says.
    rewards = np.stack([episode["reward"] for episode in first_test(run_dir)])
    ahead = np.arange(0, 26 - 3, 4)[:, None] + np.arange(1, 4)
    assert metrics[3]["test/reward_mse_constant"] == pytest.approx(rewards[:, ahead].var(), rel=1e-5)
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
            "speed/fps", *DIAGNOSTICS} <= scalars
    assert [e.step for e in events.Scalars("train/return")] == [200, 400, 600, 800]
    assert [e.step for e in events.Scalars("test/return")] == [800]
    test_line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for name in DIAGNOSTICS:  # The test's values, at its step.
        expected = [(800, pytest.approx(test_line[name], rel=1e-6))]
        assert [(e.step, e.value) for e in events.Scalars(name)] == expected
    assert sorted(events.Tags()["images"]) == ["test/episode", "test/open_loop_prediction"]
    assert any("hyperparameters" in tag for tag in events.Tags()["tensors"])
    # The first test episode as an animated GIF: its frames, up to the GIF's 64 colours.
    (gif,) = events.Images("test/episode")
    assert gif.step == 800 and gif.encoded_image_string.startswith(b"GIF89a")
    image = Image.open(io.BytesIO(gif.encoded_image_string))
    stored = load_episode(episode_paths(run_dir / "episodes" / "test")[0])["obs"]
    assert image.n_frames == len(stored) and image.size == (64, 64)
    for t in (0, len(stored) - 1):
        image.seek(t)
        frame = np.asarray(image.convert("RGB")).transpose(2, 0, 1).astype(int)
        assert np.abs(frame - stored[t]).mean() < 4


def test_test_command_plays_episodes(run_dir):
    result = run("test.py", str(run_dir), "--episodes", "2", "--device", "cpu")
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["episode 1", "episode 2"]
    returns = [float(line.split("return")[1]) for line in lines[:2]]
    mean, std = (float(x) for x in lines[2].split()[2:5:2])
    assert lines[2].startswith("mean return") and lines[2].endswith("over 2 episodes")
    assert mean == pytest.approx(np.mean(returns), abs=0.1) and std == pytest.approx(np.std(returns), abs=0.1)


@pytest.mark.parametrize("kind", ["mp4", "gif"])
def test_test_command_writes_the_episodes_as_a_video(run_dir, tmp_path, kind):
    """`--video`: 3 episodes, 2 at a time: the first round's two side by side, then the third beside
    a black tile, each frame enlarged twice (half that in a GIF)."""
    out = tmp_path / f"episodes.{kind}"
    args = ["--episodes", "3", "--parallel", "2", "--device", "cpu", "--video", "--out", str(out)]
    result = run("test.py", str(run_dir), *args, *(["--gif"] if kind == "gif" else []))
    assert result.stdout.strip().splitlines()[-1] == str(out)
    frames = 200 // 8 + 1  # Every episode of the tiny run: the reset frame and 25 decisions.
    if kind == "gif":
        # Pillow merges a frame that repeats the one before into it, adding up their durations.
        image = Image.open(out)
        ends = np.cumsum([image.seek(i) or image.info["duration"] for i in range(image.n_frames)])
        assert image.size == (2 * 64, 64) and ends[-1] == 2 * frames * 100  # 10 frames a second.
        image.seek(int(np.searchsorted(ends, frames * 100, side="right")))  # The second round's first.
        assert not np.asarray(image.convert("RGB"))[:, 64:].any()  # The second round's empty tile.
    else:
        video = cv2.VideoCapture(str(out))
        sizes = []
        while True:
            ok, frame = video.read()
            if not ok:
                break
            sizes.append(frame.shape[:2])
        assert sizes == [(128, 256)] * (2 * frames)
    refused = run("test.py", str(run_dir), "--gif", check=False)
    assert_clean_error(refused, "--gif and --out go with --video")


def test_test_command_plays_random_actions_on_the_same_episodes(run_dir, tmp_path, monkeypatch, capsys):
    """`--random` plays the planner's episodes, from the run's config alone, with the uniform draws
    of the seed; with the default seed, both play the episodes of the run's first test (README)."""
    config_only = tmp_path / "run"  # The baseline needs the run's config, not its checkpoint.
    config_only.mkdir()
    shutil.copy(run_dir / "config.json", config_only)
    (planned,), _ = play_test(monkeypatch, capsys, run_dir, "--episodes", "2", "--device", "cpu")
    (random,), _ = play_test(monkeypatch, capsys, config_only, "--episodes", "2", "--random")
    stored = first_test(run_dir)
    assert len(stored) == 2 and not np.array_equal(stored[0]["obs"][0], stored[1]["obs"][0])
    for episodes in (planned, random):
        for episode, first in zip(episodes, stored, strict=True):
            np.testing.assert_array_equal(episode["obs"][0], first["obs"][0])
    rng = np.random.default_rng(RUN_SEED)  # One draw of (2 envs, 1 action) per step.
    draws = np.stack([rng.uniform(-1, 1, (2, 1)) for _ in range(25)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(np.stack([episode["action"][1:] for episode in random]), draws)


def test_test_command_plays_rounds_of_parallel_episodes_from_its_seed(run_dir, monkeypatch, capsys):
    """`--episodes 3 --parallel 2 --seed 4`: two rounds of 2 envs, seeded with test_seeds(4, 0, 2)
    and test_seeds(4, 2, 2), of which the first 3 episodes count; the run's seed plays others."""
    rounds, returns = play_test(monkeypatch, capsys, run_dir, "--random", "--episodes", "3",
                                "--parallel", "2", "--seed", "4")
    assert [len(episodes) for episodes in rounds] == [2, 2]
    env = make_env("cartpole-swingup", action_repeat=8, max_episode_length=200)
    for seed, episode in zip(runs.test_seeds(4, 0, 4), rounds[0] + rounds[1], strict=True):
        np.testing.assert_array_equal(episode["obs"][0], env.reset(seed=seed)[0])
    env.close()
    played = rounds[0] + rounds[1][:1]  # Printed to 0.1:
    assert returns == pytest.approx([episode["reward"].sum() for episode in played], abs=0.051)
    assert not any(np.array_equal(episode["obs"][0], first["obs"][0])
                   for episode in played for first in first_test(run_dir))


def test_test_command_ends_each_episode_where_its_env_ends(run_dir, monkeypatch, capsys):
    """Two envs that end at different steps (time limits of 80 and 200 env steps, 10 and 25
    decisions): the first keeps stepping until the second ends, but its episode and its return
    stop at its own end."""
    def envs_ending_at_80_and_200(task, count, action_repeat, max_episode_length, obs, frames, action_size):
        """make_parallel_envs, but the first env's time limit is 80 steps."""
        lengths = [80, max_episode_length]
        assert count == len(lengths)
        return gym.vector.AsyncVectorEnv(
            [functools.partial(make_env, task, 0, action_repeat, length, obs, frames, action_size)
             for length in lengths],
            context="spawn", autoreset_mode=gym.vector.AutoresetMode.DISABLED)

    monkeypatch.setattr(test_script, "make_parallel_envs", envs_ending_at_80_and_200)
    (episodes,), returns = play_test(monkeypatch, capsys, run_dir, "--random", "--episodes", "2")
    assert [len(episode["reward"]) for episode in episodes] == [11, 26]
    # Each episode is its env's, to its end: one env alone replays it with the recorded actions.
    for seed, length, episode in zip(runs.test_seeds(RUN_SEED, 0, 2), [80, 200], episodes):
        env, actions = make_env("cartpole-swingup", seed, 8, length), iter(episode["action"][1:])
        replay = play_episode(env, lambda obs, action: next(actions))
        env.close()
        for key in episode:
            np.testing.assert_array_equal(replay[key], episode[key])
    assert returns == pytest.approx([episode["reward"].sum() for episode in episodes], abs=0.051)


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


def test_video_prediction_from_a_stored_episode(run_dir, tmp_path, monkeypatch):
    """`--episode FILE`: the truth panel shows the file's frames, and the difference panel is
    |truth - prediction|, pixel by pixel, below the panels' labels."""
    path = episode_paths(run_dir / "episodes" / "train")[0]
    out, frames, write_video = tmp_path / "stored.mp4", [], video_prediction.write_video

    def recorded(video, images):  # Writes the video, and keeps its frames.
        frames.extend(images)
        write_video(video, frames)

    monkeypatch.setattr(video_prediction, "write_video", recorded)
    run_in_process(monkeypatch, video_prediction, run_dir, "--episode", path, "--out", out, "--length", "20")
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT) == 25
    frames = np.stack(frames)[:, 24:].astype(np.int16)  # (25, 232, 768, 3) BGR, below the labels.
    truth, prediction, difference = frames[..., :256, :], frames[..., 256:512, :], frames[..., 512:, :]
    stored = load_episode(path)["obs"][:25].transpose(0, 2, 3, 1)[..., ::-1]  # RGB -> BGR.
    np.testing.assert_array_equal(truth, stored.repeat(4, axis=1).repeat(4, axis=2)[:, 24:])
    np.testing.assert_array_equal(difference, np.abs(truth - prediction))
    assert difference[5:].any(), "the tiny model's open-loop prediction is not the truth"


def test_video_prediction_predicts_what_a_short_episode_holds(run_dir, tmp_path):
    """An episode shorter than --context + --length (one that ended early) is predicted as far as
    it goes, with one line that says so; only one shorter than the context is refused."""
    episode = episode_paths(run_dir / "episodes" / "train")[0]  # 26 frames.
    result = run("video_prediction.py", str(run_dir), "--episode", str(episode), "--length", "22",
                 "--out", str(tmp_path / "short.mp4"))
    assert "the episode ends after 26 frames: predicting 21 open loop instead of --length 22" in result.stderr
    assert cv2.VideoCapture(str(tmp_path / "short.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 26
    result = run("video_prediction.py", str(run_dir), "--episode", str(episode), "--context", "30",
                 "--out", str(tmp_path / "shorter.mp4"), check=False)
    assert_clean_error(result, "the episode has 26 frames, fewer than --context 30")
    assert not (tmp_path / "shorter.mp4").exists()


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


VARIANTS = {  # Name -> (flags, a flag that a resumed run must refuse to change).
    "ssm": (["--model", "ssm"], ["--model", "rssm"]),
    "gru": (["--model", "gru"], ["--model", "rssm"]),
    "camera-ready": (["--preset", "camera-ready", "--overshooting-reward-scale", "100",
                      "--global-kl-beta", "0.1"], ["--state-heads", "none"]),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_model_variant_trains_resumes_tests_and_predicts(variant, tmp_path, monkeypatch, capsys):
    """The designs of Figure 4, and the camera-ready configuration (the official GRU and
    initialisation, state heads trained into the model, outgoing rewards, ...) with the official
    loss options, through the same commands, latent overshooting on; `rssm` is the run of the
    tests above."""
    run_dir = tmp_path / variant
    variant_flags, refused_change = VARIANTS[variant]
    # Free nats 0: the tiny model's KLs, some 0.3 nats, are below the default 3, which clamps them to 0.
    # One test, by the resumed run after episode 4.
    flags = [*TINY_FLAGS, *variant_flags, "--overshooting-distance", "3", "--free-nats", "0", "--test-interval", "4"]
    run("train.py", *flags, "--episodes", "3", "--run-dir", str(run_dir))
    # What the resumed run must carry on: the files so far, and the checkpoint's weights, which
    # a mark on the reward model's bias tells from a new initialisation.
    files = {path: path.stat() for path in episode_paths(run_dir / "episodes" / "train")}
    metrics_so_far = (run_dir / "metrics.jsonl").read_text()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    marked = [name for name in saved["model"] if name.startswith("reward_model.net.")][-1]  # Output bias.
    saved["model"][marked] += 1.0
    torch.save(saved, run_dir / "checkpoint.pt")
    run("train.py", "--resume", str(run_dir), "--episodes", "4")
    assert (run_dir / "metrics.jsonl").read_text().startswith(metrics_so_far)
    assert len(files) == 3
    for path, stat in files.items():  # The same files, not written again.
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["episodes"] for m in metrics] == [1, 2, 3, 4] and "test/return" in metrics[-1]
    # The overshooting KL is positive and, with weight 1, part of the total that is minimised,
    # as are, with their weights, the official options' terms and camera-ready's state heads.
    terms = {name.split("/")[1]: value for name, value in metrics[-1].items() if name.startswith("loss/")}
    assert terms["overshooting_kl"] > 0
    camera_ready = variant == "camera-ready"
    states = ["state_position", "state_velocity"] if camera_ready else []
    assert sorted(name for name in terms if name.startswith("state_")) == states
    assert all(f"test/{name}_mse_{kind}" in metrics[-1] for name in states
               for kind in ("open_loop", "filtered", "constant"))
    options = (100 * terms["overshooting_reward"] + 0.1 * terms["global_kl"] + sum(terms[name] for name in states)
               if camera_ready else 0)
    assert ("global_kl" in terms) == camera_ready
    assert terms["total"] == pytest.approx(terms["image"] + 10 * terms["reward"] + terms["kl_free"]
                                           + terms["overshooting_kl"] + options, abs=0.02)  # float32 near 1e4.
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["model"] == ("rssm" if camera_ready else variant)
    assert checkpoint["config"]["gru_cell"] == ("block" if camera_ready else "torch")
    assert checkpoint["config"]["reward_alignment"] == ("outgoing" if camera_ready else "incoming")
    # It went on from the checkpoint's weights and Adam: 3 more updates at the warm-up's learning
    # rate (at most 2.5e-5) moved the marked bias by far less than 1e-3.
    torch.testing.assert_close(checkpoint["model"][marked], saved["model"][marked], rtol=0, atol=1e-3)
    assert {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()} == {6}
    assert ("rssm.gru.weight_hh" in checkpoint["model"]) == (variant == "gru")
    assert ("rssm.gru.gates.weight" in checkpoint["model"]) == camera_ready
    assert ("reward_model.net.6.bias" in checkpoint["model"]) != camera_ready  # 2 hidden layers, not 3.
    # test.py and video_prediction.py load the variant; in this process, as the tests above ran them
    # from subprocesses already.
    out = tmp_path / "prediction.gif"
    run_in_process(monkeypatch, test_script, run_dir, "--episodes", "1", "--device", "cpu")
    run_in_process(monkeypatch, video_prediction, run_dir, "--out", out, "--length", "10", "--gif")
    assert "mean return" in capsys.readouterr().out and out.stat().st_size > 0
    refused = run("train.py", "--resume", str(run_dir), *refused_change, check=False)
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


# Loaded first by a subprocess that has its folder on PYTHONPATH: the EGL library cannot be found
# or opened there, as on a machine without it (PyOpenGL loads it through ctypes).
HIDE_EGL = '''
import ctypes, ctypes.util
find_library, load = ctypes.util.find_library, ctypes.CDLL.__init__
ctypes.util.find_library = lambda name: None if "EGL" in name else find_library(name)
def refuse_egl(self, name, *args, **kwargs):
    if name and "libEGL" in str(name):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    load(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = refuse_egl
'''


@pytest.mark.parametrize("command", [["train.py", "--task", "cartpole-swingup"], ["test.py", "log/x"],
                                     ["video_prediction.py", "log/x"], ["sweep.py"], ["plot.py", "log"],
                                     ["bench.py", "--quick"]], ids=lambda command: command[0])
def test_without_the_egl_library_every_command_says_what_to_install(tmp_path, command):
    (tmp_path / "sitecustomize.py").write_text(HIDE_EGL)
    result = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "MUJOCO_GL": "egl"})
    assert_clean_error(result, "error: MuJoCo cannot render with MUJOCO_GL=egl")
    assert "sudo apt-get install libegl1 libegl-mesa0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_glfw_without_a_display_says_what_to_do(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "train.py", *TINY_FLAGS, "--log-dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**env, "MUJOCO_GL": "glfw"})
    assert_clean_error(result, "error: MuJoCo cannot render with MUJOCO_GL=glfw without a display")
    assert result.stderr.strip().splitlines()[-1].endswith("or run under xvfb-run")


def test_wandb_logs_what_tensorboard_gets_and_a_resume_continues_its_run(tmp_path):
    """--wandb in W&B's offline mode: the config, scalars and images land in RUN_DIR/wandb, and the
    resumed run writes under the same W&B run id."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for flags in ([*TINY_FLAGS, "--run-dir", str(run_dir), "--wandb"], ["--resume", str(run_dir), "--episodes", "5"]):
        result = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
    run_id = (run_dir / "wandb_id").read_text()
    first, resumed = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert first.name.endswith(run_id) and resumed.name.endswith(run_id)
    log = (first / f"run-{run_id}.wandb").read_bytes()
    for key in (b"test/return", b"loss/total", b"train/return", b"collect_interval"):
        assert key in log, key
    assert b"loss/total" in (resumed / f"run-{run_id}.wandb").read_bytes()  # --wandb stays on, as in config.json.
    images = {path.suffix for path in (first / "files" / "media" / "images").iterdir()}
    assert images == {".gif", ".png"}  # The test episode and the open-loop prediction.
    assert not list((run_dir / "wandb").rglob("events.out.tfevents.*")), "W&B copied the event files"


def test_wandb_is_imported_only_when_asked_for(tmp_path, monkeypatch):
    check = "import sys, train; assert 'wandb' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT, timeout=300).returncode == 0
    monkeypatch.setitem(sys.modules, "wandb", None)  # As if it were not installed.
    with pytest.raises(ValueError, match="--wandb needs the wandb package: pip install wandb"):
        logger.start_wandb(Config(), tmp_path)
