"""One agent for several tasks (paper Sec. 5, Figure 6): padded actions, the tasks collected in turn,
per-task tests and metrics, resume, test.py/video_prediction.py --task and plot.py, end to end."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_FLAGS
from test_commands import assert_clean_error, run
from utils import ReplayBuffer, episode_paths, load_episode
from wrappers import MULTI_TASKS, check_task, make_env, task_list

TASKS = ("cartpole-swingup", "finger-spin")  # 1 and 2 action dimensions; 10 and 40 decisions of 80 steps.


def multi_flags(*extra):
    flags = TINY_FLAGS.copy()
    flags[flags.index("--task") + 1] = ",".join(TASKS)
    flags[flags.index("--seed-episodes") + 1] = "1"
    flags[flags.index("--episodes") + 1] = "6"
    flags[flags.index("--max-episode-length") + 1] = "80"
    return [*flags, *extra]


def task_of(episode):
    """Which task an episode file holds: finger's state has a `touch` part, cartpole's does not."""
    return "finger-spin" if "state_touch" in episode else "cartpole-swingup"


def test_the_papers_tasks_and_their_checks():
    assert task_list("all") == ["cartpole-balance", "cartpole-swingup", "finger-spin", "cheetah-run",
                                "cup-catch", "walker-walk"] == list(MULTI_TASKS["all"])
    assert task_list("cheetah-run") == ["cheetah-run"]
    with pytest.raises(ValueError, match="names a task twice"):
        check_task("cheetah-run,cheetah-run")
    with pytest.raises(ValueError, match="a multi-task run learns from pixels"):
        check_task("all", "state")
    with pytest.raises(ValueError, match="unknown task 'cheetah-walk'"):
        check_task("cheetah-run,cheetah-walk")


def test_padded_actions_use_the_tasks_own_dimensions_and_ignore_the_rest():
    padded, plain = (make_env("finger-spin", seed=2, action_repeat=2, max_episode_length=20, action_size=size)
                     for size in (6, None))
    assert padded.action_space.shape == (6,) and padded.action_size == 6 and plain.action_size == 2
    padded.reset(), plain.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = rng.uniform(-1, 1, 6).astype(np.float32)
        obs, reward, *_ = padded.step(action)
        expected_obs, expected_reward, *_ = plain.step(action[:2])
        np.testing.assert_array_equal(obs, expected_obs)
        assert reward == expected_reward
    padded.close(), plain.close()
    with pytest.raises(ValueError, match="has 6 action dimensions, more than 2"):
        make_env("cheetah-run", action_size=2)


def test_chunks_by_episode_give_each_episode_its_share():
    """A short and a long episode: uniform over chunk starts, the long one's 96 starts take 94% of
    the chunks; drawn by episode (a multi-task run's replay), each takes half."""
    episodes = [{"obs": np.full((length, 1), i, np.float32), "action": np.zeros((length, 1), np.float32),
                 "reward": np.zeros(length, np.float32)} for i, length in enumerate((10, 100))]
    shares = []
    for by_episode in (False, True):
        buffer = ReplayBuffer(5, seed=0, by_episode=by_episode)
        for episode in episodes:
            buffer.add(episode)
        obs, *_ = buffer.sample(20_000)
        assert (obs == obs[:1]).all()  # Never across episodes.
        shares.append(float((obs[0] == 0).mean()))
    assert shares[0] == pytest.approx(6 / 102, abs=0.01) and shares[1] == pytest.approx(0.5, abs=0.02)


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    """Killed after 3 episodes, mid-cycle, then resumed to 6."""
    run_dir = tmp_path_factory.mktemp("multi") / "run"
    run("train.py", *multi_flags(), "--episodes", "3", "--run-dir", str(run_dir))
    run("train.py", "--resume", str(run_dir), "--episodes", "6")
    return run_dir


def test_the_tasks_take_turns_with_padded_actions_and_resume_in_order(multi_run):
    config = json.loads((multi_run / "config.json").read_text())
    assert config["task"] == ",".join(TASKS) and config["action_repeat"] == 0  # Each task its own.
    episodes = [load_episode(path) for path in episode_paths(multi_run / "episodes" / "train")]
    assert [task_of(episode) for episode in episodes] == [*TASKS] * 3
    # 80 env steps: cartpole repeats 8 (10 decisions), finger 2 (40); both take 2-dim actions.
    assert [len(episode["reward"]) for episode in episodes] == [11, 41] * 3
    assert all(episode["action"].shape[1] == 2 for episode in episodes)
    records = [json.loads(line) for line in (multi_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [[key for key in r if key.startswith("train/return/")] for r in records] == \
        [[f"train/return/{task}"] for task in TASKS * 3]
    assert [r["updates"] for r in records] == [0, 0, 3, 6, 9, 12]  # One seed episode per task.
    assert (records[-1]["env_steps/cartpole-swingup"], records[-1]["env_steps/finger-spin"]) == (240, 240)


def test_each_test_plays_every_task_and_logs_each_and_the_mean(multi_run):
    records = [json.loads(line) for line in (multi_run / "metrics.jsonl").read_text().splitlines()]
    tested = [r for r in records if "test/return" in r]
    assert [r["episodes"] for r in tested] == [3, 4, 6]  # The killed run's last episode, then every 2.
    for record in tested:
        returns = [record[f"test/return/{task}"] for task in TASKS]
        assert record["test/return"] == pytest.approx(np.mean(returns))
        assert all(f"test/return_std/{task}" in record for task in TASKS)
        assert np.isfinite(record["test/image_mse_open_loop"])
    test_episodes = [load_episode(path) for path in episode_paths(multi_run / "episodes" / "test")]
    assert [task_of(episode) for episode in test_episodes] == [task for task in TASKS for _ in range(2)] * 3
    assert tested[-1]["test_episodes"] == 12


def test_test_command_plays_every_task_or_the_one_asked(multi_run, tmp_path):
    out = run("test.py", str(multi_run), "--episodes", "1", "--device", "cpu").stdout
    means = [line for line in out.splitlines() if "mean return" in line]
    assert [line.split(":")[0] for line in means] == list(TASKS) and "mean over the 2 tasks" in out
    out = run("test.py", str(multi_run), "--episodes", "2", "--device", "cpu", "--task", "finger-spin",
              "--video", "--out", str(tmp_path / "finger.mp4")).stdout
    means = [line for line in out.splitlines() if "mean return" in line]
    assert [line.split(":")[0] for line in means] == ["finger-spin"] and "mean over" not in out
    assert (tmp_path / "finger_finger-spin.mp4").stat().st_size > 0
    assert_clean_error(run("test.py", str(multi_run), "--task", "walker-walk", check=False),
                       "the run's tasks are cartpole-swingup, finger-spin, not walker-walk")


def test_video_prediction_writes_one_video_per_task(multi_run, tmp_path):
    out = run("video_prediction.py", str(multi_run), "--context", "2", "--length", "3", "--device", "cpu",
              "--out", str(tmp_path / "prediction.mp4")).stdout
    assert [Path(line).name for line in out.split()] == [f"prediction_{task}.mp4" for task in TASKS]
    out = run("video_prediction.py", str(multi_run), "--context", "2", "--length", "3", "--device", "cpu",
              "--out", str(tmp_path / "cartpole.mp4"), "--task", "cartpole-swingup").stdout
    assert [Path(line).name for line in out.split()] == ["cartpole.mp4"]


def test_plot_draws_each_task_of_a_multitask_run_beside_the_single_task_runs(multi_run, tmp_path):
    single = tmp_path / "single"
    flags = multi_flags()
    flags[flags.index("--task") + 1] = "cartpole-swingup"
    run("train.py", *flags, "--episodes", "3", "--run-dir", str(single))
    out = run("plot.py", str(multi_run), str(single), "--out", str(tmp_path / "plots"), "--episodes", "3").stdout
    rows = [line.split(" | ")[0] for line in out.split("## Runs")[0].splitlines() if line.startswith("| ")][2:]
    assert rows == [f"| cartpole-swingup (agent=multi-task ({','.join(TASKS)}))", "| cartpole-swingup (agent=single-task)",
                    "| finger-spin"]
    assert (tmp_path / "plots" / "learning_curves.png").stat().st_size > 0


def test_a_multitask_run_has_no_state_heads():
    result = run("train.py", *multi_flags(), "--state-heads", "diagnostic", check=False)
    assert result.returncode == 2 and "a multi-task run has no state heads" in result.stderr
