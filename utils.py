"""Replay buffer, episode files, bit-depth pre/post-processing and small shared helpers."""
import contextlib
import ctypes
import functools
import io
import json
import os
import queue
import random
import threading
from pathlib import Path

import numpy as np
import torch



# --- Bit-depth reduction (PlaNet Appendix A: 5-bit images with uniform dequantisation noise). ---

def preprocess_observation(obs, bit_depth=5, generator=None):
    """uint8 `(..., 3, 64, 64)` tensor -> float in [-0.5, 0.5), on the tensor's device.

    x = floor(o / 2^(8-b)) / 2^b + U(0, 1/2^b) - 0.5, computed as (U(0, 1) + (o >> (8-b))) / 2^b - 0.5
    in place on the noise, since a batch is 30M pixels. `generator` draws the noise.
    Observation vectors (`--obs state`, float) pass as they are: bit depth is a matter of pixels.
    """
    if obs.is_floating_point():
        return obs.float()
    noise = torch.rand(obs.shape, generator=generator, device=obs.device)
    return noise.add_(obs >> (8 - bit_depth)).div_(2 ** bit_depth).sub_(0.5)


def postprocess_observation(x, bit_depth=5):
    """Float image around [-0.5, 0.5) -> uint8 for viewing: floor(2^b (x + 0.5)) / 2^b, to [0, 255]."""
    bins = 2 ** bit_depth
    levels = torch.floor(bins * (x + 0.5)).clamp(0, bins - 1)
    return (levels * (256 // bins)).to(torch.uint8)


# --- Episodes: dicts of arrays of length T + 1, `action[t]` led to `obs[t]`, zeros at reset. ---

def atomic_write(path, write):
    """Call `write(file)` on a temporary file beside `path`, fsync, then rename it to `path`, so
    that `path` is either the old or the new complete file, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_episode(directory, index, episode):
    """Write an episode as `{index:06d}-{length}.npz` (compressed), atomically. Returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{index:06d}-{len(episode['reward']) - 1}.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **episode)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def load_episode(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def episode_index(path):
    """`000042-250.npz` -> 42."""
    return int(Path(path).name.split("-")[0])


def episode_paths(directory):
    """The episode files of a directory in the order they were written."""
    return sorted(Path(directory).glob("*.npz"))


REPLAY_KEYS = ("obs", "action", "reward")


class ReplayBuffer:
    """Episodes in memory, sampled as chunks of `L` consecutive steps inside one episode.

    Every chunk start is equally likely: a batch draws `B` integers over all valid starts and
    maps them to (episode, offset) with one `searchsorted`, so sampling never scans the episodes.
    With `by_episode`, each chunk's episode is drawn first, uniformly among those that hold a
    chunk, then its start: the official loaders' one chunk per episode drawn (0c6f7d3
    `tools/chunk_sequence.py:49-56`), which a multi-task run needs so that each task gets its share
    of the chunks whatever its episodes' lengths. Chunks never cross an episode end. When the
    buffer holds more than `capacity` steps, the oldest episodes leave memory (their files stay on
    disk).

    Without `pad` (the Control Suite, whose episodes are all longer than a chunk) an episode
    shorter than `L` gives no chunk. With `pad` (envs that end early), it gives one, from its
    start, padded with zeros to `L`: an episode of n steps gives max(n - L + 1, 1) chunks, so that
    it is drawn by what it holds and a 5-step one is not drawn as often as a 1000-step one. A
    padded buffer also keeps each step's `terminal` flag (1 where the env terminated, not where a
    time limit truncated it) and returns it and the steps' `valid` mask after the keys.
    """

    def __init__(self, chunk_length, capacity=1_000_000, seed=0, keys=REPLAY_KEYS, by_episode=False, pad=False):
        self.chunk_length = chunk_length
        self.capacity = capacity
        self.pad = pad
        self.keys = tuple(keys) + (("terminal",) if pad else ())  # What each step stores.
        self.by_episode = by_episode
        self.episodes = []
        self.rng = np.random.default_rng(seed)
        self._starts = np.zeros(0, dtype=np.int64)  # Valid chunk starts per episode.

    @property
    def steps(self):
        return sum(len(episode["reward"]) for episode in self.episodes)

    def add(self, episode):
        self.episodes.append(self._with_terminal(episode))
        while len(self.episodes) > 1 and self.steps > self.capacity:
            self.episodes.pop(0)
        lengths = np.array([len(episode["reward"]) for episode in self.episodes])
        self._starts = np.maximum(lengths - self.chunk_length + 1, 1 if self.pad else 0)

    def _with_terminal(self, episode):
        """A padded buffer's episode with its `terminal` flags, none for one recorded before they were."""
        if not self.pad or "terminal" in episode:
            return episode
        return {**episode, "terminal": np.zeros(len(episode["reward"]), np.float32)}

    def chunk_count(self):
        """How many distinct chunks the buffer holds: without `pad`, 0 while every episode is
        shorter than `L`."""
        return int(self._starts.sum())

    def chunk_starts(self, batch_size):
        """Draw `B` chunks: -> their episodes' positions in `self.episodes` and their offsets, `(B,)`."""
        cumulative = np.cumsum(self._starts)
        if len(cumulative) == 0 or cumulative[-1] == 0:
            raise ValueError(f"no episode holds a chunk of {self.chunk_length} steps yet")
        if self.by_episode:
            holding = np.flatnonzero(self._starts)
            index = holding[self.rng.integers(len(holding), size=batch_size)]
            return index, self.rng.integers(self._starts[index])
        flat = self.rng.integers(cumulative[-1], size=batch_size)
        index = np.searchsorted(cumulative, flat, side="right")
        return index, flat - (cumulative[index] - self._starts[index])

    def valid_steps(self, index, offset):
        """`(L, B)` float32: 1 for the steps of the chunks that lie inside their episodes, 0 for padding."""
        lengths = np.array([len(self.episodes[i]["reward"]) for i in index])
        return (np.arange(self.chunk_length)[:, None] < (lengths - offset)[None]).astype(np.float32)

    def sample(self, batch_size):
        """-> one array per key, time-major: obs uint8 `(L, B, 3, 64, 64)`, actions `(L, B, A)`,
        rewards `(L, B)`, then any further keys (e.g. `state_position` `(L, B, 3)`); with `pad`,
        then `terminal` and `valid`, `(L, B)` each."""
        index, offset = self.chunk_starts(batch_size)
        arrays = tuple(np.stack([self._slice(self.episodes[i][key], o) for i, o in zip(index, offset)], axis=1)
                       for key in self.keys)
        return (*arrays, self.valid_steps(index, offset)) if self.pad else arrays

    def _slice(self, values, offset):
        """`L` steps of one key from `offset`, zeros past the episode's end."""
        chunk = values[offset:offset + self.chunk_length]
        if len(chunk) == self.chunk_length:
            return chunk
        return np.concatenate([chunk, np.zeros((self.chunk_length - len(chunk), *chunk.shape[1:]), chunk.dtype)])


class DeviceReplayBuffer(ReplayBuffer):
    """The replay buffer kept on the device (`--replay-on-device`): every step in memory lies in
    one flat tensor per key (obs as uint8), episode after episode, and a batch is one gather there,
    with no copy from the host. It draws its chunks exactly as `ReplayBuffer` does (the same
    generator, the same `chunk_starts`), so a seed gives the same batches on either.

    The flat tensors grow by doubling; when the oldest episodes leave memory, the rest move down.
    `sample` returns tensors on the device: obs `(L, B, 3, 64, 64)` uint8, actions `(L, B, A)`,
    rewards `(L, B)`, then any further keys.
    """

    def __init__(self, chunk_length, capacity=1_000_000, seed=0, device="cpu", keys=REPLAY_KEYS, by_episode=False,
                 pad=False):
        super().__init__(chunk_length, capacity, seed, keys, by_episode, pad)
        self.device = torch.device(device)
        self._flat = None  # key -> tensor (capacity, ...), the first `self._used` rows filled.
        self._used = 0
        self._first = np.zeros(0, dtype=np.int64)  # Each episode's first row.

    def add(self, episode):
        episode = self._with_terminal(episode)
        length = len(episode["reward"])
        if self._flat is None:
            self._flat = {key: torch.empty((length, *episode[key].shape[1:]), device=self.device,
                                           dtype=torch.from_numpy(episode[key][:1]).dtype) for key in self.keys}
        if self._used + length > len(self._flat["reward"]):
            size = max(2 * len(self._flat["reward"]), self._used + length)
            self._flat = {key: torch.cat([value[:self._used], value.new_empty((size - self._used, *value.shape[1:]))])
                          for key, value in self._flat.items()}
        for key in self.keys:
            self._flat[key][self._used:self._used + length] = torch.from_numpy(episode[key]).to(self.device)
        self._used += length
        # Only the lengths stay on the host; `self.episodes` keeps what ReplayBuffer needs of them.
        super().add({"reward": episode["reward"]})
        lengths = np.array([len(e["reward"]) for e in self.episodes])
        dropped = self._used - lengths.sum()
        if dropped:  # The oldest episodes left: move the rest down.
            for value in self._flat.values():
                value[:self._used - dropped] = value[dropped:self._used].clone()
            self._used -= dropped
        self._first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def sample(self, batch_size):
        index, offset = self.chunk_starts(batch_size)
        rows = torch.as_tensor(self._first[index] + offset, device=self.device)
        rows = rows + torch.arange(self.chunk_length, device=self.device)[:, None]  # (L, B)
        if not self.pad:
            return tuple(self._flat[key][rows] for key in self.keys)
        # Padding: the rows past an episode's end read its last row, then are zeroed.
        valid = torch.as_tensor(self.valid_steps(index, offset), device=self.device)
        lengths = np.array([len(self.episodes[i]["reward"]) for i in index])
        rows = torch.minimum(rows, torch.as_tensor(self._first[index] + lengths - 1, device=self.device))
        arrays = []
        for key in self.keys:
            values = self._flat[key][rows]
            arrays.append(values * valid.view(*valid.shape, *[1] * (values.dim() - 2)).to(values.dtype))
        return (*arrays, valid)


class BatchPrefetcher:
    """`count` training batches, each sampled from the replay buffer, moved to `device` and
    preprocessed there by a background thread that keeps `depth` batches ahead of the training
    loop, so that the update step does not wait for its data.

    Iterating yields obs `(L, B, 3, 64, 64)` float, actions `(L, B, A)` and rewards `(L, B)` on the
    device, then the buffer's further keys. While it runs, the thread is the only user of the
    buffer's sampler and of `generator` (the dequantisation noise), and it draws exactly `count`
    batches: the batches, and the generators' states afterwards, are those of sampling one batch
    per update in the loop.
    """

    def __init__(self, buffer, batch_size, count, device, bit_depth=5, generator=None, depth=2):
        self.buffer, self.batch_size, self.count = buffer, batch_size, count
        self.device, self.bit_depth, self.generator = torch.device(device), bit_depth, generator
        self.depth = depth

    def batch(self):
        """One batch, made in the calling thread."""
        batch = [torch.as_tensor(x) for x in self.buffer.sample(self.batch_size)]
        if batch[0].device.type == "cpu" and self.device.type == "cuda":  # From the host replay:
            batch = [x.pin_memory() for x in batch]  # async copies.
        # A no-op for a DeviceReplayBuffer's, which are there already.
        obs, *rest = (x.to(self.device, non_blocking=True) for x in batch)
        return preprocess_observation(obs, self.bit_depth, self.generator), *rest

    def _produce(self, ready):
        try:
            # On a GPU the copies and preprocessing run on a side stream that the consumer waits on,
            # and that waits for what the consumer's stream did before (a DeviceReplayBuffer's adds).
            stream = side_stream(self.device) if self.device.type == "cuda" else None
            if stream:
                stream.wait_event(ready)
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for _ in range(self.count):
                    batch = self.batch()
                    if not self._put((batch, stream.record_event() if stream else None)):
                        return
        except BaseException as error:  # Raised again in the training loop.
            self._put(error)

    def _put(self, item):
        """Queue `item` unless the loop stopped early. -> whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        ready = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        thread = threading.Thread(target=self._produce, args=(ready,), name="batch-prefetcher", daemon=True)
        thread.start()
        try:
            for _ in range(self.count):
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(event)
                    for x in batch:  # Keep the side stream's memory until the consumer is done.
                        x.record_stream(consumer)
                yield batch
        finally:
            self._stop.set()
            thread.join()


@functools.cache
def side_stream(device):
    """One side stream per GPU for the prefetcher. A new stream per call would strand memory: the
    caching allocator keeps freed blocks per stream, and new streams rotate through a pool of 32.
    It is a high-priority stream, from another pool than the default priority's, from which CUDA
    graphs take their capture streams (`capture.CUDAGraphed`): after 32 captures one of those
    would otherwise be this stream, and a capture would record the prefetcher's copies."""
    return torch.cuda.Stream(device, priority=-1)


def outgoing_reward_chunks(obs, actions, rewards, *states):
    """Camera-ready `0c6f7d3`'s data alignment (`--reward-alignment outgoing`), made from chunks of
    L + 1 stored steps: L steps whose `rewards[t]` is the reward of the transition that *leaves*
    `obs[t]`, driven by the action taken there, and whose first action is zero.

    Camera-ready stores at each step the observation, the action taken at it and the reward that
    follows, without the final observation (`control/wrappers.py:455-468`), and shifts the actions
    by one step with a zero first in each chunk (`training/define_model.py:41-42`). We store the
    action and reward that *led to* `obs[t]` (HEAD's alignment), so the same chunk is: the first L
    frames (and states), the actions that led to them with the first zeroed, and the next L rewards.
    All `(L + 1, B, ...)` -> `(L, B, ...)`.
    """
    first_action = torch.zeros_like(actions[:1])
    return (obs[:-1], torch.cat([first_action, actions[1:-1]]), rewards[1:], *(state[:-1] for state in states))


# --- Small helpers. ---

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h).


def keep_freed_memory():
    """Have glibc keep freed memory for reuse rather than hand it back to the OS.

    By default a CPU tensor of a few MB is mapped afresh at every op and page-faulted in as it is
    written: 2.5 million page faults per update step and 80,000 per CEM call at the paper's sizes,
    a sixth of their time. Here allocations below 1 GiB come from the heap, which is never trimmed,
    so the process keeps its peak memory and faults only while it first grows. (Measured at the
    paper's sizes: 0 faults per update from the third on, against 366,000 with glibc's trimming;
    a 2 GiB trim threshold also reaches 0 and kept the same 3.1-4.0 GB.) No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim (man 3 mallopt).


def derive_seed(*keys):
    """A 32-bit seed for the stream named by `keys`, e.g. (run seed, tag, index): streams with
    different keys are independent (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def set_seed_everywhere(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pack_random_state(state):
    """A numpy `RandomState.get_state()` tuple in a form `torch.load(weights_only=True)` accepts. A
    `Generator`'s `bit_generator.state` (a dict of ints and strings) passes as it is."""
    if isinstance(state, dict):
        return state
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, keys.tolist(), position, has_gauss, cached_gaussian)


def unpack_random_state(state):
    if isinstance(state, dict):
        return state
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)


def global_rng_state():
    """The states of Python's, numpy's and torch's (CPU and CUDA) global generators."""
    return {"python": random.getstate(), "numpy": pack_random_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_global_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(unpack_random_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def resolve_device(name):
    """`auto` -> `cuda` when a GPU is there, else `cpu`. Raises ValueError for an absent GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def set_matmul_precision(device, tf32):
    """On CUDA, float32 matmuls and cuDNN convolutions on TF32 tensor cores (`--tf32`: a 10-bit
    mantissa) or in full float32, cuDNN's convolutions included, which PyTorch otherwise runs in
    TF32. The paper's V100 had no TF32. A CPU keeps PyTorch's defaults."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32


def write_json(path, data):
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def read_jsonl(path):
    """The complete, parseable lines of a JSONL file; a torn last line is dropped."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_jsonl(path, records):
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
