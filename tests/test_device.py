"""The device computes what the CPU computes, and each speed path computes what eager PyTorch does.

These tests take `--device` (default cpu). On a GPU, `python -m pytest -m device --device cuda
tests` runs them there; `python bench.py --check` does, and turns on in its training run only the
speed paths whose tests passed. On the CPU they run every line of the speed paths but the CUDA
graphs (which Inductor adds around the same compiled code) and compare the CPU with itself.

Tolerances, relative to the eager float32 computation on the CPU, over a few steps of a small
model: float32 paths 1e-4 on each loss term and 1e-3 on the gradients (compiled kernels sum in
another order), TF32 (a 10-bit mantissa) 1e-2, bf16 autocast of the convolutions (8 bits) 5e-2.
Gradients are compared as whole vectors: their norms within the tolerance, their directions
within cosine 1 - tolerance / 10.
"""
import gc
import weakref

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from agent import cem_plan, rollout_returns
from conftest import TINY_FLAGS, TINY_MODEL, make_episode
from model import WorldModel
from config import Config
from runs import load_run
from train import build_optimizer, gradient_function, main as train_main, update
from utils import DeviceReplayBuffer, ReplayBuffer, preprocess_observation, set_matmul_precision

pytestmark = pytest.mark.device

SPEED_PATHS = {  # Path name -> its Config settings. Those that compile last.
    "tf32": {"tf32": True},
    "bf16": {"bf16": True},
    "capture_update": {"capture_update": True},
    # What training may combine, all at once (the compiled update is the captured one's alternative).
    "all": {"capture_update": True, "tf32": True, "bf16": True},
    "compile_update": {"compile_update": True},
}
TOLERANCE = {"eager": 1e-4, "capture_update": 1e-4, "compile_update": 1e-4, "tf32": 1e-2, "bf16": 5e-2,
             "all": 5e-2}


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """--tf32 and the tests set process-wide flags: leave them as they were."""
    cudnn = torch.backends.cudnn
    saved = torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(saved[0])
    cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved[1:]


def only(paths, **settings):
    """A Config with exactly the speed paths `paths` on, whatever the device's defaults."""
    return Config(**settings, **paths).for_device("cpu")


def fixed_batch(action_size=2, steps=3, batch=4, seed=0):
    """Preprocessed chunks on the CPU, the same on every device: obs `(L, B, 3, 64, 64)`."""
    rng = np.random.default_rng(seed)
    obs = torch.from_numpy(rng.integers(0, 256, (steps, batch, 3, 64, 64), dtype=np.uint8))
    obs = preprocess_observation(obs, 5, torch.Generator().manual_seed(seed))
    actions = torch.from_numpy(rng.uniform(-1, 1, (steps, batch, action_size)).astype(np.float32))
    rewards = torch.from_numpy(rng.uniform(0, 1, (steps, batch)).astype(np.float32))
    return obs, actions, rewards


# Three calls of a captured function, each on new inputs: on CUDA the first warms up, captures
# and replays the CUDA graph (`capture.CUDAGraphed`), and the next two replay it.
CALLS = 3


def update_steps(config, device, weights, seed=0):
    """CALLS `train.update`s, each on another fixed batch, of a copy of `weights` on `device` with
    `config`'s speed paths. -> the last step's loss terms and flat gradient, on the CPU."""
    config = config.for_device(device)
    set_matmul_precision(device, config.tf32)
    model = WorldModel(2, **TINY_MODEL, model=config.model, bf16=config.bf16).to(device)
    model.load_state_dict(weights)
    optimizer = build_optimizer(model, config)  # Fused, as train.py's.
    gradients = gradient_function(model, device, config.compile_update, config.capture_update)
    torch.manual_seed(seed)  # The posterior samples' noise (the CUDA generator too).
    for i in range(CALLS):
        batch = [x.to(device) for x in fixed_batch(seed=i)]
        terms = update(model, optimizer, batch, config, 1000 + i, gradients)
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()
    return {name: float(value) for name, value in terms.items()}, gradient


def assert_same_step(step, reference, tolerance):
    (terms, gradient), (expected_terms, expected_gradient) = step, reference
    for name, value in expected_terms.items():
        assert terms[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
    assert gradient.norm() == pytest.approx(expected_gradient.norm(), rel=tolerance)
    cosine = torch.nn.functional.cosine_similarity(gradient, expected_gradient, dim=0)
    assert cosine > 1 - tolerance / 10, f"gradient direction differs: cosine {cosine:.6f}"


@pytest.mark.parametrize("path", ["eager", *SPEED_PATHS])
def test_update_step_matches_the_cpu(path, device):
    """The deterministic model (`--model gru`: no random draws, so that devices compare) takes
    the same steps on the device, with the path, as eager on the CPU."""
    if path == "eager" and device.type == "cpu":
        pytest.skip("the CPU against itself")
    config = only(SPEED_PATHS.get(path, {}), model="gru", batch_size=4, chunk_length=3)
    weights = WorldModel(2, **TINY_MODEL, model="gru").state_dict()
    reference = update_steps(only({}, model="gru"), torch.device("cpu"), weights)
    step = update_steps(config, device, weights)
    assert_same_step(step, reference, TOLERANCE[path])
    if config.bf16 or (config.tf32 and device.type == "cuda"):  # Lower precision is really on.
        assert not torch.equal(step[1], reference[1])


@pytest.mark.parametrize("path", ["capture_update", "compile_update"])
def test_update_step_with_samples_matches_eager_on_the_device(path, device):
    """The RSSM with its posterior samples: the captured loss replays eager's kernels and draws,
    and the compiled one draws the eager noise (`fallback_random`), so a seed gives the eager
    steps on the same device."""
    config = only(SPEED_PATHS[path], batch_size=4, chunk_length=3)
    weights = WorldModel(2, **TINY_MODEL).state_dict()
    reference = update_steps(only({}), device, weights, seed=3)
    assert_same_step(update_steps(config, device, weights, seed=3), reference, TOLERANCE[path])


# Ops that wait for the device (a Python number or bool out of a tensor) or whose output's shape
# depends on the data: CUDA graph capture refuses both.
HOST_SYNCS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "repeat_interleave", "_unique",
              "_unique2", "unique_dim", "unique_consecutive"}


class RefuseHostSyncs(TorchDispatchMode):
    """Fails on any op of `HOST_SYNCS`, and on a copy from a device to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        assert name not in HOST_SYNCS, f"{func} syncs with the host: a CUDA graph cannot capture it"
        out = func(*args, **(kwargs or {}))
        devices = {x.device.type for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.device.type == "cpu" and devices - {"cpu", "meta"}:
            raise AssertionError(f"{func} copies from {devices} to the host")
        return out


@pytest.mark.parametrize("model_name", ["rssm", "ssm", "gru"])
def test_captured_functions_never_sync_with_the_host(model_name, device):
    """What --capture-update and --capture-planner capture, the loss with every term and its
    backward, and the CEM call, runs without one op that a CUDA graph cannot capture. On a CPU,
    where backward runs in this thread, the check sees the backward's ops too."""
    states = {"position": torch.randn(3, 4, 2).to(device)}
    model = WorldModel(2, **TINY_MODEL, model=model_name, state_heads="loss", state_sizes={"position": 2}).to(device)
    batch = [x.to(device) for x in fixed_batch()]
    with RefuseHostSyncs():
        loss, _ = model.loss(*batch, overshooting_distance=3, overshooting_reward_scale=1.0, global_kl_beta=0.1,
                             states=states)
        loss.backward()
        belief, state = model.rssm.initial(2, device)
        cem_plan(model.rssm, model.reward_model, belief, state, horizon=3, iterations=2, candidates=16,
                 top_candidates=4, discount=0.99)


def test_host_sync_refusal_bites(device):
    """The check above fails on an op that syncs."""
    with pytest.raises(AssertionError, match="syncs with the host"), RefuseHostSyncs():
        float(torch.ones(2, device=device).sum())


def test_graph_keys_keep_no_model_alive():
    """The planner's graphs are cached for the process's life (`agent.captured_cem_plan`): their
    keys hold a module weakly, with its mode, and a gone module's key matches no new module."""
    from capture import signature
    model = torch.nn.Linear(2, 2)
    key = signature(model)
    assert key == signature(model) and hash(key) == hash(signature(model))
    assert key != signature(torch.nn.Linear(2, 2)) and key != signature(model.eval())
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "the key let the model go"
    assert key != signature(torch.nn.Linear(2, 2).train())


@pytest.mark.parametrize("path", ["capture_planner", "all"])
def test_cem_plan_matches_eager(path, device):
    """--capture-planner: seed for seed, the eager plan, for three calls in a row on different
    beliefs (a replayed CUDA graph must read its new inputs). `all` adds TF32 to both."""
    config = only({"capture_planner": True, "tf32": path == "all"}, horizon=3, iterations=2, candidates=64,
                  top_candidates=8)
    set_matmul_precision(device, config.tf32)
    model = WorldModel(2, **TINY_MODEL).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(3, 16, generator=generator).to(device), torch.randn(3, 4, generator=generator).to(device))
              for _ in range(CALLS)]
    plans = {}
    for name, plan in (("eager", cem_plan), (path, config.plan(device))):
        plans[name] = []
        for i, (belief, state) in enumerate(inputs):
            torch.manual_seed(10 + i)
            plans[name].append(plan(model.rssm, model.reward_model, belief, state, **config.planner).cpu())
    for ours, eager in zip(plans[path], plans["eager"]):
        torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(plans[path][1], plans[path][2]), "a call returned the plan of the one before"


@pytest.mark.parametrize("path", ["tf32"])
def test_rollout_returns_match_eager(path, device):
    """--tf32: the planner's predicted returns of fixed action sequences, with the same noise, are
    float32's within TF32's tolerance. (Its plans are not compared: TF32 rounding may swap two
    candidates at the top-K cut, and then the plan differs by more than any rounding.)"""
    model = WorldModel(2, **TINY_MODEL).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    belief, state = torch.randn(64, 16, generator=generator), torch.randn(64, 4, generator=generator)
    actions = torch.rand(5, 64, 2, generator=generator) * 2 - 1
    returns = {}
    for tf32 in (False, True):
        set_matmul_precision(device, tf32)
        torch.manual_seed(7)
        with torch.no_grad():
            returns[tf32] = rollout_returns(model.rssm, model.reward_model, actions.to(device), belief.to(device),
                                            state.to(device)).cpu()
    torch.testing.assert_close(returns[True], returns[False], rtol=TOLERANCE[path], atol=TOLERANCE[path])


def test_device_replay_samples_what_the_host_replay_samples(device):
    """--replay-on-device: the same chunks as the host buffer for a seed, inside one episode each,
    also after the oldest episodes leave memory and after a resume from the generator's state.
    Frames preprocessed there carry dequantisation noise inside their bin: [0, 1/2^5)."""
    host = ReplayBuffer(chunk_length=6, capacity=120, seed=5)
    ours = DeviceReplayBuffer(chunk_length=6, capacity=120, seed=5, device=device)
    lengths = [30, 5, 12, 40, 7, 33, 20]
    for i, length in enumerate(lengths):
        episode = make_episode(i, length)
        host.add(episode)
        ours.add(episode)
        if i < 3:
            continue  # Chunks from the first episodes, then after some have left memory.
        for expected, sampled in zip(host.sample(16), ours.sample(16)):
            assert sampled.device.type == device.type
            np.testing.assert_array_equal(sampled.cpu().numpy(), expected)
    assert ours.steps == host.steps <= 120 and len(ours.episodes) == len(host.episodes) < len(lengths)
    obs = ours.sample(64)[0]
    episode_ids, steps = obs[:, :, 0, 0, 0].long(), obs[:, :, 0, 0, 1].long()
    assert (episode_ids == episode_ids[0]).all() and (steps.diff(dim=0) == 1).all()
    # A resumed buffer: the same episodes and the generator's state give the same next batch.
    resumed = DeviceReplayBuffer(chunk_length=6, capacity=120, seed=0, device=device)
    for i, length in enumerate(lengths):
        resumed.add(make_episode(i, length))
    resumed.rng.bit_generator.state = ours.rng.bit_generator.state
    for expected, sampled in zip(ours.sample(8), resumed.sample(8)):
        assert torch.equal(sampled, expected)
    x = preprocess_observation(obs, 5, torch.Generator(device).manual_seed(0))
    noise = x + 0.5 - (obs >> 3).float() / 32
    # U(0, 1) lies in [0, 1 - 2^-24], but next to a bin of 16 or more float32 rounds the top
    # 2^-20 of it to the bin's upper edge: the edge itself is reached, never passed.
    assert noise.min() >= 0 and noise.max() <= 1 / 32 and noise.max() - noise.min() > 0.9 / 32
    assert (noise < 1 / 32).float().mean() > 1 - 1e-5


def run_state(run_dir, device="cpu"):
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)
    return checkpoint["counters"], checkpoint["model"]


def test_checkpoints_move_between_the_cpu_and_the_device(device, tmp_path, capsys):
    """A run on the device with --replay-on-device, stopped after 3 episodes and resumed, is the
    same run with the host replay, bit for bit; its checkpoint loads on the CPU and the CPU
    resumes it; a CPU run resumes on the device."""
    # Bit for bit on a GPU too: cuDNN's fastest convolution algorithms need not be deterministic.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    flags = TINY_FLAGS + ["--test-interval", "10", "--device", str(device), "--episodes", "3"]
    for name, replay in (("host", []), ("ours", ["--replay-on-device"])):
        train_main(flags + replay + ["--run-dir", str(tmp_path / name)])
        train_main(["--resume", str(tmp_path / name), "--episodes", "4"])
    (counters, model), (expected_counters, expected) = run_state(tmp_path / "ours"), run_state(tmp_path / "host")
    assert {**counters, "wall_clock_s": None} == {**expected_counters, "wall_clock_s": None}
    assert counters["episodes"] == 4
    for name, value in expected.items():
        assert torch.equal(model[name], value), name
    # Written on the device, read on the CPU: test.py and video_prediction.py use load_run.
    _, cpu_model, _ = load_run(tmp_path / "ours", torch.device("cpu"))
    for name, value in cpu_model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, expected[name].cpu()), name
    if device.type == "cpu":
        return  # The rest crosses devices; resuming on the CPU is tests/test_resume.py's.
    capsys.readouterr()
    train_main(["--resume", str(tmp_path / "ours"), "--episodes", "5", "--device", "cpu"])
    assert run_state(tmp_path / "ours")[0]["episodes"] == 5
    assert "written on cuda: reseeded the batch noise;" in capsys.readouterr().err
    # And the reverse: a CPU run continues on the device.
    train_main(TINY_FLAGS + ["--test-interval", "10", "--episodes", "3", "--run-dir", str(tmp_path / "cpu")])
    capsys.readouterr()
    train_main(["--resume", str(tmp_path / "cpu"), "--episodes", "4", "--device", str(device)])
    assert "reseeded the batch noise and the CUDA generators" in capsys.readouterr().err
    counters, model = run_state(tmp_path / "cpu")
    assert counters["episodes"] == 4 and all(value.device.type == "cpu" for value in model.values())

