"""Fewer kernel launches, the same mathematics (issue 35): the RSSM's filter and rollout, the
planner and the fused Adam against step-by-step computations, a checkpoint of main before them,
and the launch counts at the paper's sizes."""
import json
from pathlib import Path

import pytest
import torch

import bench
from agent import cem_plan, rollout_returns
from config import Config
from conftest import TINY_MODEL
from model import MODELS, TransitionModel, WorldModel, gpu_order
from runs import load_run
from test_model import independent_loss
from test_termination import fixed_batch
from train import build_optimizer, clip_gradients, load_optimizer_state

MAIN_RUN = Path(__file__).parent / "data" / "main-75ce0f0"  # A tiny run from states, by main at 75ce0f0.
PAPER_PLANNER = {"horizon": 12, "iterations": 10, "candidates": 1000, "top_candidates": 100}


def loss_and_gradients(model, seed=5, **options):
    obs, actions, rewards, states = fixed_batch(states=True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    total, terms = model.loss(obs, actions, rewards, states=states, **options)
    total.backward()
    return terms, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["rssm", "gru"])
def test_the_filter_is_obs_step_step_by_step(variant, monkeypatch):
    """RSSM.observe (input layers split by columns, the prior head once after the loop) against
    the interface's loop over `obs_step`, which concatenates and runs every layer each step:
    every loss term and every gradient, with overshooting, state heads and the global KL on."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, model=variant, state_heads="loss", state_sizes={"position": 3})
    options = {"free_nats": 0.1, "overshooting_distance": 3, "overshooting_reward_scale": 0.5, "global_kl_beta": 0.1}
    terms, gradients = loss_and_gradients(model, **options)
    monkeypatch.setattr(type(model.rssm), "observe", TransitionModel.observe)
    step_terms, step_gradients = loss_and_gradients(model, **options)
    assert terms.keys() == step_terms.keys() and gradients.keys() == step_gradients.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], step_terms[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in gradients:
        torch.testing.assert_close(gradients[name], step_gradients[name], rtol=1e-4, atol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for name, g in gradients.items() if name.startswith("rssm."))


@pytest.mark.parametrize("variant", MODELS)
def test_loss_gradients_match_the_independent_computation(variant):
    """The gradient of the loss, not only its value, against `independent_loss` (torch.distributions,
    layer by layer), for each transition model."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, model=variant)
    obs, actions, rewards, _ = fixed_batch()
    parameters = [p for p in model.parameters()]
    torch.manual_seed(2)
    total, _ = model.loss(obs, actions, rewards, free_nats=0.5)
    gradients = torch.autograd.grad(total, parameters, allow_unused=True)
    torch.manual_seed(2)
    expected_total, _ = independent_loss(model, obs, actions, rewards, 0.5, 10.0)
    expected = torch.autograd.grad(expected_total, parameters, allow_unused=True)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)
    for gradient, reference in zip(gradients, expected):
        if reference is None:  # The prior head of a model whose KL is zero below the free nats.
            assert gradient is None or not gradient.any()
        else:
            torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", MODELS)
def test_the_rollout_is_img_step_step_by_step(variant, monkeypatch):
    """`imagine` (the actions' columns in one matmul, the noise drawn at once) against the
    interface's loop over `img_step`, and CEM's plan on a seed with either, in the CPU's order
    and in the GPU's: the same rollout, the same plan."""
    torch.manual_seed(0)
    rssm = WorldModel(2, **TINY_MODEL, model=variant).rssm
    reward_model = WorldModel(2, **TINY_MODEL, model=variant).reward_model
    belief, state = torch.randn(3, rssm.belief_size), torch.randn(3, 4)
    actions = torch.rand(6, 3, 2) * 2 - 1
    planner = {"horizon": 4, "iterations": 3, "candidates": 20, "top_candidates": 5}

    def rollout_and_plans():
        with torch.no_grad():
            torch.manual_seed(1)
            rollout = rssm.imagine(actions, belief, state)
            plans = []
            for order in (False, True):
                torch.manual_seed(2)
                stacked = lambda *args, **kwargs: rollout_returns(*args, **kwargs, stacked=order)
                plans.append(cem_plan(rssm, reward_model, belief, state, **planner, rollout=stacked))
        return rollout, plans

    rollout, plans = rollout_and_plans()
    monkeypatch.setattr(type(rssm), "imagine", TransitionModel.imagine)
    step_rollout, step_plans = rollout_and_plans()
    for fast, step in zip(rollout, step_rollout):
        torch.testing.assert_close(fast, step)
    for plan in plans + step_plans[1:]:
        torch.testing.assert_close(plan, step_plans[0])
    assert rollout[1].std() > 0


def test_a_checkpoint_written_by_main_before_the_change_plans_the_same():
    """A run that main wrote at 75ce0f0 (`tests/data`), before these changes: it loads, and CEM
    plans from it what main planned (recorded there with this test's seeds), at its own settings
    and the paper's."""
    config, model, _ = load_run(MAIN_RUN, torch.device("cpu"))
    main = {"run": [[-0.3193933367729187], [-0.48906368017196655]],
            "paper": [[-0.27266165614128113], [0.008535375818610191]]}
    torch.manual_seed(7)
    belief, state = torch.randn(2, 16), torch.randn(2, 4)
    for name, planner in (("run", config.planner), ("paper", PAPER_PLANNER)):
        torch.manual_seed(0)
        plan = cem_plan(model.rssm, model.reward_model, belief, state, **planner)
        torch.testing.assert_close(plan, torch.tensor(main[name]), rtol=1e-5, atol=1e-6)


def test_adam_of_a_checkpoint_from_before_fusing_resumes_fused_and_steps_the_same():
    """A checkpoint written before Adam was fused holds `fused: None`; loading keeps this code's
    fused Adam, and its next step is the step of the loop over parameters, to float rounding."""
    config, model, _ = load_run(MAIN_RUN, torch.device("cpu"))
    results = []
    for fused in (True, False):
        # Each its own copy of the moments, which a step updates in place.
        checkpoint = torch.load(MAIN_RUN / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert checkpoint["optimizer"]["param_groups"][0]["fused"] is None
        copy = load_run(MAIN_RUN, torch.device("cpu"))[1]
        optimizer = (build_optimizer(copy, config) if fused else
                     torch.optim.Adam(copy.parameters(), lr=config.learning_rate, eps=config.adam_epsilon))
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        assert optimizer.param_groups[0]["fused"] is (True if fused else None)
        for p in copy.parameters():
            p.grad = torch.full_like(p, 0.01)
        optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in copy.parameters()]))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(results[0], before), "the step moved the weights"
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_at_the_papers_sizes_a_gpu_order_launches_a_third_fewer(tmp_path):
    """The launch counts that bench.py reports, by the CPU's count in the GPU's order, at the
    paper's sizes (cheetah-run's six actions, L = 50, H=12 I=10 J=1000 K=100): the CEM call
    within 2,700 ops and the update within 3,600 (they were 3,334 and 5,438 before)."""
    config = Config(task="cheetah-run", device="cpu")
    model = WorldModel(6)
    optimizer = build_optimizer(model, config)
    # The count depends on the chunk length and the planner's H and I, not on B or J: B = 2 counts
    # what B = 50 does, in a tenth of the time.
    obs = torch.rand(50, 2, 3, 64, 64) - 0.5
    actions, rewards = torch.rand(50, 2, 6) * 2 - 1, torch.rand(50, 2)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model.loss(obs, actions, rewards)[0].backward()
        clip_gradients(model, config)
        optimizer.step()

    belief, state = model.rssm.initial(1, "cpu")
    step()
    with gpu_order(), torch.no_grad():
        plan = bench.count_launches(lambda: cem_plan(model.rssm, model.reward_model, belief, state,
                                                     **PAPER_PLANNER), torch.device("cpu"))
    with gpu_order():
        update = bench.count_launches(step, torch.device("cpu"))
    assert plan["ops"] <= 2700 and update["ops"] <= 3600, (plan, update)
