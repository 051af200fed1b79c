"""Bit-depth processing, episode files, the replay buffer and the open-loop diagnostics."""
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, make_episode
from utils import (BatchPrefetcher, ReplayBuffer, episode_paths, load_episode,
                   outgoing_reward_chunks, postprocess_observation, preprocess_observation, save_episode)


def test_bit_depth_round_trip():
    obs = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(3, 3, 16, 16)
    x = preprocess_observation(obs, bit_depth=5)
    assert x.dtype == torch.float32 and x.min() >= -0.5 and x.max() < 0.5
    # The noise stays inside each of the 32 bins, so postprocessing recovers the bin exactly.
    torch.testing.assert_close(postprocess_observation(x, bit_depth=5), (obs // 8) * 8)
    # Dequantisation noise fills the bin: values of one bin spread over its width 1/32.
    values = preprocess_observation(torch.full((10_000,), 100, dtype=torch.uint8), bit_depth=5)
    assert values.min() >= 12 / 32 - 0.5 and values.max() < 13 / 32 - 0.5
    assert values.max() - values.min() > 0.9 / 32


def test_chunks_never_cross_an_episode_end_and_cover_every_start():
    buffer = ReplayBuffer(chunk_length=10, seed=0)
    lengths = [30, 9, 12, 50]  # Episode 1 (10 frames) holds one chunk, episode 2 holds four.
    for i, length in enumerate(lengths):
        buffer.add(make_episode(i, length))
    starts = set()
    for _ in range(200):
        obs, action, reward = buffer.sample(batch_size=16)
        assert obs.shape == (10, 16, 3, 64, 64) and action.shape == (10, 16, 2) and reward.shape == (10, 16)
        episode_ids, steps = obs[:, :, 0, 0, 0].astype(int), obs[:, :, 0, 0, 1].astype(int)
        assert (episode_ids == episode_ids[0]).all(), "a chunk mixes episodes"
        assert (np.diff(steps, axis=0) == 1).all(), "a chunk is not consecutive"
        assert (steps[-1] <= np.array(lengths)[episode_ids[0]]).all(), "a chunk runs past the end"
        np.testing.assert_array_equal(reward, steps)
        starts.update(zip(episode_ids[0], steps[0]))
    valid = {(i, s) for i, length in enumerate(lengths) for s in range(length + 1 - 10 + 1)}
    assert starts == valid  # Uniform over starts: with 3200 draws over 84 starts, all are hit.


def test_sampling_is_uniform_over_chunk_starts():
    buffer = ReplayBuffer(chunk_length=5, seed=1)
    buffer.add(make_episode(0, 4))   # 1 start
    buffer.add(make_episode(1, 13))  # 10 starts
    obs, _, _ = buffer.sample(batch_size=22_000)
    share = (obs[0, :, 0, 0, 0] == 0).mean()
    assert share == pytest.approx(1 / 11, abs=0.01)


def test_capacity_drops_the_oldest_episodes_from_memory():
    buffer = ReplayBuffer(chunk_length=5, capacity=100, seed=0)
    for i in range(5):
        buffer.add(make_episode(i, 40))
    assert buffer.steps <= 100
    assert [int(e["obs"][0, 0, 0, 0]) for e in buffer.episodes] == [3, 4]


def test_prefetched_batches_are_those_of_sampling_in_the_loop():
    """The background thread draws the same batches and leaves the generators in the same state."""
    def setup():
        buffer = ReplayBuffer(chunk_length=6, seed=4)
        for i in range(3):
            buffer.add(make_episode(i, 20))
        return buffer, torch.Generator().manual_seed(5)

    buffer, generator = setup()
    prefetched = list(BatchPrefetcher(buffer, 3, count=5, device="cpu", generator=generator))
    expected_buffer, expected_generator = setup()
    batcher = BatchPrefetcher(expected_buffer, 3, count=5, device="cpu", generator=expected_generator)
    expected = [batcher.batch() for _ in range(5)]
    assert len(prefetched) == 5
    for batch, expected_batch in zip(prefetched, expected):
        assert batch[0].shape == (6, 3, 3, 64, 64) and batch[0].dtype == torch.float32
        for x, y in zip(batch, expected_batch):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert buffer.rng.integers(1 << 30) == expected_buffer.rng.integers(1 << 30)
    assert torch.equal(generator.get_state(), expected_generator.get_state())


def test_prefetcher_stops_early_and_runs_again():
    """A loop that breaks off leaves no thread behind; iterating again gives `count` batches."""
    buffer = ReplayBuffer(chunk_length=4, seed=0)
    buffer.add(make_episode(0, 12))
    batches = BatchPrefetcher(buffer, 2, count=6, device="cpu")
    for i, _ in enumerate(batches):
        if i == 1:
            break
    assert len(list(batches)) == 6
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetcher"]


def test_prefetcher_raises_the_threads_error_in_the_loop():
    buffer = ReplayBuffer(chunk_length=50)
    buffer.add(make_episode(0, 10))
    with pytest.raises(ValueError, match="chunk of 50"):
        list(BatchPrefetcher(buffer, 4, count=3, device="cpu"))


def test_sampling_an_empty_buffer_says_why():
    buffer = ReplayBuffer(chunk_length=50)
    buffer.add(make_episode(0, 10))
    with pytest.raises(ValueError, match="chunk of 50"):
        buffer.sample(4)


def test_episode_files_round_trip(tmp_path):
    episode = make_episode(7, 25)
    path = save_episode(tmp_path, 3, episode)
    assert path.name == "000003-25.npz"
    save_episode(tmp_path, 12, make_episode(8, 5))
    assert [p.name for p in episode_paths(tmp_path)] == ["000003-25.npz", "000012-5.npz"]
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"
    loaded = load_episode(path)
    for key in episode:
        np.testing.assert_array_equal(loaded[key], episode[key])
        assert loaded[key].dtype == episode[key].dtype


def test_outgoing_rewards_make_the_camera_ready_chunks():
    """Camera-ready stores, per step, the observation, the action taken at it and the reward that
    follows, without the final observation (`control/wrappers.py:455-468`), and feeds the actions
    shifted by one with a zero first (`training/define_model.py:41-42`). Built by hand from an
    episode in our storage, its chunks are those that `outgoing_reward_chunks` makes from L + 1
    stored steps, and the replay's starts cover the same range, 0 .. T - L."""
    rng = np.random.default_rng(0)
    length, chunk = 12, 5
    episode = make_episode(3, length)
    episode["action"][1:] = rng.uniform(-1, 1, (length, 2))
    episode["reward"][1:] = rng.normal(size=length)
    episode["state_position"] = rng.normal(size=(length + 1, 3)).astype(np.float32)
    taken, after = episode["action"][1:], episode["reward"][1:]  # At obs[t], and the reward after it.
    buffer = ReplayBuffer(chunk + 1, seed=0, keys=("obs", "action", "reward", "state_position"))
    buffer.add(episode)
    assert buffer._starts.tolist() == [length - chunk + 1]
    for start in range(length - chunk + 1):
        stored = [torch.as_tensor(episode[key][start:start + chunk + 1]) for key in buffer.keys]
        obs, actions, rewards, positions = outgoing_reward_chunks(*stored)
        np.testing.assert_array_equal(obs.numpy(), episode["obs"][start:start + chunk])
        np.testing.assert_array_equal(actions.numpy(),
                                      np.concatenate([np.zeros((1, 2)), taken[start:start + chunk - 1]]))
        np.testing.assert_array_equal(rewards.numpy(), after[start:start + chunk])
        np.testing.assert_array_equal(positions.numpy(), episode["state_position"][start:start + chunk])


@pytest.mark.parametrize("keep", [True, False])
def test_freed_memory_stays_mapped(keep):
    """After `keep_freed_memory`, a freed 400 MB tensor stays in the process for the next one;
    without it glibc unmaps the tensor at once. In a fresh process, whose heap nothing else shaped."""
    script = f"""
import os, torch, utils
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if {keep}:
    utils.keep_freed_memory()
before = rss_mb()
tensor = torch.ones(100_000_000)
del tensor
print(rss_mb() - before)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    kept_mb = float(result.stdout)
    assert kept_mb > 350 if keep else kept_mb < 50, kept_mb
