"""Shapes, parameter counts and the loss of the world model, against independent computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from conftest import TINY_MODEL
from model import MODELS, RSSM, SSM, Encoder, Gaussian, ObservationModel, RewardModel, WorldModel, gaussian_kl
from tf_layers import BlockGRUCell


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_sizes_and_parameter_counts():
    encoder, rssm, decoder, reward = Encoder(), RSSM(6), ObservationModel(), RewardModel()
    assert (count(encoder), count(decoder), count(reward), count(rssm)) == (690_144, 3_795_555, 250_201, 557_920)
    assert (rssm.belief_size, rssm.state_size, rssm.gru.hidden_size, encoder.embed_size) == (200, 30, 200, 1024)


@pytest.mark.parametrize("variant, belief_size", [("rssm", 200), ("ssm", 0), ("gru", 200)])
def test_shapes(variant, belief_size):
    torch.manual_seed(0)
    model = WorldModel(6, model=variant)
    encoder, rssm, decoder, reward = model.encoder, model.rssm, model.observation_model, model.reward_model
    obs = torch.rand(5, 2, 3, 64, 64) - 0.5
    embed = encoder(obs)
    assert embed.shape == (5, 2, 1024)
    belief, state = rssm.initial(2, "cpu")
    beliefs, priors, posteriors = rssm.observe(embed, torch.zeros(5, 2, 6), belief, state)
    assert beliefs.shape == (5, 2, belief_size) and rssm.feature_size == belief_size + 30
    for gaussian in (priors, posteriors):
        assert gaussian.mean.shape == gaussian.std.shape == (5, 2, 30)
        assert (gaussian.std >= 0.1).all()
    assert posteriors.sample.shape == (5, 2, 30)
    assert priors.sample is None, "the filter feeds posteriors forward and draws no prior sample"
    feature = torch.cat([posteriors.sample, beliefs], -1)
    assert decoder(feature).shape == (5, 2, 3, 64, 64)
    assert reward(feature).shape == (5, 2)
    imagined_beliefs, imagined_states = rssm.imagine(torch.zeros(7, 2, 6), beliefs[-1], posteriors.sample[-1])
    assert imagined_beliefs.shape == (7, 2, belief_size) and imagined_states.shape == (7, 2, 30)


def test_block_gru_cell_is_tensorflows():
    """`--gru-cell block`: TensorFlow's GRUBlockCell (contrib `gru_ops.h`), written out in numpy:
    r and u from one sigmoid layer on [x, h], the candidate from [x, r * h], h' = u h + (1 - u) c;
    gate biases start at 1, the candidate's at 0."""
    torch.manual_seed(0)
    cell = BlockGRUCell(3, 5)
    assert (cell.gates.bias == 1).all() and (cell.candidate.bias == 0).all()
    assert count(cell) == 8 * 10 + 10 + 8 * 5 + 5  # One bias per gate; nn.GRUCell has two.
    with torch.no_grad():
        for parameter in cell.parameters():
            parameter.normal_()
    x, h = torch.randn(4, 3), torch.randn(4, 5)
    w_ru, b_ru = cell.gates.weight.detach().numpy().T, cell.gates.bias.detach().numpy()
    w_c, b_c = cell.candidate.weight.detach().numpy().T, cell.candidate.bias.detach().numpy()
    xn, hn = x.numpy(), h.numpy()
    ru = 1 / (1 + np.exp(-(np.concatenate([xn, hn], 1) @ w_ru + b_ru)))
    r, u = ru[:, :5], ru[:, 5:]
    c = np.tanh(np.concatenate([xn, r * hn], 1) @ w_c + b_c)
    np.testing.assert_allclose(cell(x, h).detach().numpy(), u * hn + (1 - u) * c, rtol=1e-5, atol=1e-6)


def glorot_limit(fan_in, fan_out):
    return math.sqrt(6 / (fan_in + fan_out))


def test_glorot_init_is_tensorflows_default():
    """`--init glorot`: every linear and conv layer gets U(+-sqrt(6 / (fan_in + fan_out))) kernels
    and zero biases, a Gaussian's (mean, std) layer as two layers of S outputs; the GRU keeps its
    own. With PyTorch's default, biases are not zero."""
    torch.manual_seed(0)
    model = WorldModel(6, init="glorot", gru_cell="block")
    expected = {  # (kernel fan in, kernel fan out) of each layer, as TensorFlow counts them.
        "encoder.convs.0": (3 * 16, 32 * 16), "encoder.convs.6": (128 * 16, 256 * 16),
        "observation_model.fc": (230, 1024), "observation_model.deconvs.0": (1024 * 25, 128 * 25),
        "observation_model.deconvs.6": (32 * 36, 3 * 36), "reward_model.net.0": (230, 300),
        "rssm.fc_state_action": (36, 200), "rssm.fc_prior": (200, 30), "rssm.fc_posterior_hidden": (1224, 200),
        "rssm.gru.gates": (400, 400), "rssm.gru.candidate": (400, 200)}
    modules = dict(model.named_modules())
    for name, fans in expected.items():
        weight, limit = modules[name].weight, glorot_limit(*fans)
        assert weight.abs().max() <= limit
        spread = 4 / math.sqrt(2 * weight.numel())  # 4 standard errors of a sample std.
        assert weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=spread), name
    biases = {name: module.bias for name, module in modules.items()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))}
    assert all((bias == (1 if name == "rssm.gru.gates" else 0)).all() for name, bias in biases.items())
    default = WorldModel(6)
    assert default.reward_model.net[0].bias.abs().sum() > 0
    assert default.rssm.gru.bias_ih.abs().sum() > 0


def test_ssm_sizes_follow_the_official_code():
    """One hidden layer of 200 in the transition and in the posterior, which sees the prior's mean
    and std and the embed (official `models/ssm.py`)."""
    ssm = SSM(6)
    assert count(ssm) == (36 * 200 + 200) + (200 * 60 + 60) + (1084 * 200 + 200) + (200 * 60 + 60)


def test_kl_is_posterior_to_prior_and_matches_hand_computation():
    q = Gaussian(torch.tensor([0.0]), torch.tensor([1.0]), None)
    p = Gaussian(torch.tensor([1.0]), torch.tensor([2.0]), None)
    # KL(N(0,1) || N(1,2)) = log 2 + (1 + 1) / 8 - 1/2; the reverse is 1/2 (4 + 1 - 1 - log 4).
    assert gaussian_kl(q, p).item() == pytest.approx(math.log(2) + 0.25 - 0.5)
    assert gaussian_kl(p, q).item() == pytest.approx(0.5 * (4 - math.log(4)))
    mean, std = torch.randn(2, 4, 30), torch.rand(2, 4, 30) + 0.1
    q, p = Gaussian(mean[0], std[0], None), Gaussian(mean[1], std[1], None)
    expected = kl_divergence(Normal(mean[0], std[0]), Normal(mean[1], std[1])).sum(-1)
    torch.testing.assert_close(gaussian_kl(q, p), expected)


def independent_rssm_step(rssm, belief, state, action, embed):
    """One step of the RSSM from its layers, with torch.distributions. Draws the posterior sample,
    the one that the filter feeds forward; with `mean_only` (the GRU variant) draws nothing."""
    hidden = F.relu(rssm.fc_state_action(torch.cat([state, action], -1)))
    belief = rssm.gru(hidden, belief)
    prior_mean, prior_std = rssm.fc_prior(F.relu(rssm.fc_prior_hidden(belief))).chunk(2, -1)
    prior = Normal(prior_mean, F.softplus(prior_std) + 0.1)
    post_mean, post_std = rssm.fc_posterior(
        F.relu(rssm.fc_posterior_hidden(torch.cat([belief, embed], -1)))).chunk(2, -1)
    posterior = Normal(post_mean, F.softplus(post_std) + 0.1)
    if rssm.mean_only:
        return belief, posterior.mean, prior, posterior
    return belief, posterior.rsample(), prior, posterior


def independent_ssm_step(ssm, belief, state, action, embed):
    """One step of the SSM from its layers: no belief, the posterior sees the prior's parameters."""
    prior_mean, prior_std = ssm.fc_transition(
        F.relu(ssm.fc_transition_hidden(torch.cat([state, action], -1)))).chunk(2, -1)
    prior = Normal(prior_mean, F.softplus(prior_std) + 0.1)
    post_mean, post_std = ssm.fc_posterior(F.relu(ssm.fc_posterior_hidden(
        torch.cat([prior.mean, prior.stddev, embed], -1)))).chunk(2, -1)
    posterior = Normal(post_mean, F.softplus(post_std) + 0.1)
    return belief, posterior.rsample(), prior, posterior


def independent_loss(model, obs, actions, rewards, free_nats, reward_scale):
    """The loss of the spec written out step by step from the layers, with torch.distributions."""
    rssm = model.rssm
    step = independent_ssm_step if isinstance(rssm, SSM) else independent_rssm_step
    steps, batch = actions.shape[:2]
    belief = torch.zeros(batch, rssm.belief_size)
    state = torch.zeros(batch, rssm.state_size)
    embeds = model.encoder(obs)
    image, reward, kl = 0.0, 0.0, []
    for t in range(steps):
        belief, state, prior, posterior = step(rssm, belief, state, actions[t], embeds[t])
        feature = torch.cat([state, belief], -1)
        dims = tuple(range(1, obs[t].dim()))  # Each pixel, or each dimension of a vector.
        image = image - Normal(model.observation_model(feature), 1.0).log_prob(obs[t]).sum(dims).mean()
        reward = reward - Normal(model.reward_model(feature), 1.0).log_prob(rewards[t]).mean()
        kl.append(kl_divergence(posterior, prior).sum(-1))
    kl = torch.stack(kl)
    image, reward = image / steps, reward / steps
    kl_free = torch.clamp(kl - free_nats, min=0).mean()
    return image + reward_scale * reward + kl_free, {model.observation_model.name: image, "reward": reward,
                                                     "kl": kl.mean(), "kl_free": kl_free}


@pytest.mark.parametrize("variant", MODELS)
@pytest.mark.parametrize("free_nats", [0.0, 0.5, 3.0])
def test_loss_matches_independent_computation(variant, free_nats):
    tiny_model = WorldModel(2, **TINY_MODEL, model=variant)
    torch.manual_seed(1)
    obs, actions, rewards = torch.rand(6, 3, 3, 64, 64) - 0.5, torch.rand(6, 3, 2) * 2 - 1, torch.randn(6, 3)
    torch.manual_seed(2)
    total, terms = tiny_model.loss(obs, actions, rewards, free_nats=free_nats, reward_scale=10.0)
    torch.manual_seed(2)
    expected_total, expected = independent_loss(tiny_model, obs, actions, rewards, free_nats, 10.0)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)
    assert terms["image"] > 64 * 64 * 3 * 0.5 * math.log(2 * math.pi)  # Nats, constant included.


def test_loss_from_states_is_a_unit_gaussian_on_the_vector():
    """--obs state: the same loss with the MLPs, the observation term summed over the vector's 7
    dimensions; a vector is not bit-reduced, so the term can fall below the constant."""
    model = WorldModel(2, **TINY_MODEL, obs_size=7, embed_size=16)
    torch.manual_seed(1)
    obs, actions, rewards = torch.randn(6, 3, 7), torch.rand(6, 3, 2) * 2 - 1, torch.randn(6, 3)
    torch.manual_seed(2)
    total, terms = model.loss(obs, actions, rewards, free_nats=0.0, reward_scale=10.0)
    torch.manual_seed(2)
    expected_total, expected = independent_loss(model, obs, actions, rewards, 0.0, 10.0)
    assert set(expected) <= set(terms) and "image" not in terms
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-5)
    assert terms["observation"] > 7 * 0.5 * math.log(2 * math.pi)


def test_free_nats_gate_the_kl_gradient_for_prior_and_posterior(tiny_model):
    torch.manual_seed(0)
    obs, actions, rewards = torch.rand(4, 2, 3, 64, 64) - 0.5, torch.zeros(4, 2, 2), torch.zeros(4, 2)

    def grads(free_nats):
        tiny_model.zero_grad()
        torch.manual_seed(3)
        tiny_model.loss(obs, actions, rewards, free_nats=free_nats)[0].backward()
        return tiny_model.rssm.fc_prior.weight.grad.clone(), tiny_model.rssm.fc_posterior.weight.grad.clone()

    prior_grad, posterior_grad = grads(0.0)
    free_prior_grad, free_posterior_grad = grads(1e9)
    assert prior_grad.abs().sum() > 0, "the KL must train the prior"
    assert free_prior_grad.abs().sum() == 0, "a KL under the free nats must not train the prior"
    assert not torch.allclose(posterior_grad, free_posterior_grad), "the KL must train the posterior"


def independent_overshooting(model, beliefs, posteriors, actions, rewards, distance, free_nats):
    """Latent overshooting step by step as the official `tools/overshooting.py` and
    `training/utility.py` compute it, for a `mean_only` model (its rollouts draw nothing): column
    t starts from the posterior at t - 1 (the zero state for t = 0) and its step k = 0, 1, ...
    takes `actions[t + k]` to the prior of distance d = k + 1, matched to the posterior and the
    reward at t + k. Only d = 2..D count, only targets inside the chunk; free nats per element of
    the KL, the mean over the valid pairs of each d, then over d. -> the KL and the reward NLL."""
    steps, batch = actions.shape[:2]
    kls, reward_nlls = {}, {}
    for t in range(steps):
        if t == 0:
            belief, state = model.rssm.initial(batch, "cpu")
        else:
            belief, state = beliefs[t - 1], posteriors.sample[t - 1]
        for k in range(min(distance, steps - t)):
            belief, prior = model.rssm.img_step(state, actions[t + k], belief)
            state = prior.sample
            if k + 1 >= 2:
                target = Normal(posteriors.mean[t + k], posteriors.std[t + k])
                kl = kl_divergence(target, Normal(prior.mean, prior.std)).sum(-1)
                kls.setdefault(k + 1, []).append(torch.clamp(kl - free_nats, min=0))
                predicted = model.reward_model(torch.cat([state, belief], -1))
                reward_nlls.setdefault(k + 1, []).append(-Normal(predicted, 1.0).log_prob(rewards[t + k]))
    return tuple(torch.stack([torch.stack(values).mean() for values in per_distance.values()]).mean()
                 for per_distance in (kls, reward_nlls))


def overshooting_inputs(model, steps=6, batch=2):
    """Beliefs, posteriors, actions and rewards of a chunk; the first two are leaf tensors that
    record their gradients."""
    torch.manual_seed(0)
    obs, actions = torch.rand(steps, batch, 3, 64, 64) - 0.5, torch.rand(steps, batch, 2) * 2 - 1
    with torch.no_grad():
        beliefs, _, posteriors = model.rssm.observe(model.encoder(obs), actions,
                                                    *model.rssm.initial(batch, "cpu"))
    leaves = [x.clone().requires_grad_() for x in (beliefs, *posteriors)]
    return leaves[0], Gaussian(*leaves[1:]), actions, torch.randn(steps, batch)


@pytest.mark.parametrize("free_nats", [0.0, 0.2])
def test_latent_overshooting_matches_independent_computation(free_nats):
    """The KL and the reward overshooting (`--overshooting-reward-scale`) against the official loop."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, model="gru")
    beliefs, posteriors, actions, rewards = overshooting_inputs(model)
    for distance in (2, 3, 6, 9):
        expected = independent_overshooting(model, beliefs, posteriors, actions, rewards, distance, free_nats)
        result = model._overshooting(beliefs, posteriors, actions, rewards, distance, free_nats, with_reward=True)
        torch.testing.assert_close(result, expected)
        assert model._overshooting(beliefs, posteriors, actions, rewards, distance, free_nats,
                                   with_reward=False) == (result[0], None)
    assert result[0] > 0


def test_latent_overshooting_adds_a_term_and_stops_target_gradients(tiny_model):
    torch.manual_seed(0)
    obs, actions, rewards = torch.rand(5, 2, 3, 64, 64) - 0.5, torch.rand(5, 2, 2), torch.randn(5, 2)
    torch.manual_seed(4)
    _, plain = tiny_model.loss(obs, actions, rewards, free_nats=0.0)
    torch.manual_seed(4)
    _, terms = tiny_model.loss(obs, actions, rewards, free_nats=0.0, overshooting_distance=3,
                               overshooting_kl_beta=0.5, overshooting_reward_scale=7.0)
    assert terms["overshooting_kl"] > 0 and terms["overshooting_reward"] > 0
    torch.testing.assert_close(terms["total"], plain["total"] + 0.5 * terms["overshooting_kl"]
                               + 7.0 * terms["overshooting_reward"])
    # The gradient reaches the start of each rollout, never the posterior it is matched to.
    beliefs, posteriors, actions, rewards = overshooting_inputs(tiny_model)
    tiny_model._overshooting(beliefs, posteriors, actions, rewards, 3, 0.0, with_reward=False)[0].backward()
    assert posteriors.mean.grad is None and posteriors.std.grad is None
    start_grad = posteriors.sample.grad.abs().sum((1, 2))
    assert (start_grad[:-2] > 0).all(), "every start with two steps ahead in the chunk is trained"
    assert (start_grad[-2:] == 0).all(), "the last two steps have no target two steps ahead"
    assert (beliefs.grad.abs().sum((1, 2))[:-2] > 0).all()


def test_global_kl_prior_matches_independent_computation(tiny_model):
    """`--global-kl-beta`: KL(posterior || N(0, I)), summed over the state, averaged over time and
    batch, no free nats (camera-ready `training/utility.py`), added with its weight."""
    torch.manual_seed(0)
    obs, actions, rewards = torch.rand(5, 2, 3, 64, 64) - 0.5, torch.rand(5, 2, 2), torch.randn(5, 2)
    torch.manual_seed(4)
    _, plain = tiny_model.loss(obs, actions, rewards)
    torch.manual_seed(4)
    _, terms = tiny_model.loss(obs, actions, rewards, global_kl_beta=0.1)
    torch.manual_seed(4)
    _, _, posteriors = tiny_model.rssm.observe(tiny_model.encoder(obs), actions,
                                               *tiny_model.rssm.initial(2, "cpu"))
    unit = Normal(torch.zeros(5, 2, 4), torch.ones(5, 2, 4))
    expected = kl_divergence(Normal(posteriors.mean, posteriors.std), unit).sum(-1).mean()
    torch.testing.assert_close(terms["global_kl"], expected.detach())
    torch.testing.assert_close(terms["total"], plain["total"] + 0.1 * expected.detach())
    assert "global_kl" not in plain


@pytest.mark.parametrize("state_heads", ["loss", "diagnostic"])
def test_state_heads_are_unit_gaussians_trained_into_the_model_or_not(state_heads):
    """Each part of the proprioceptive state gets a head of the reward model's shape, whose term is
    -log N(state | head(features), I) summed over the part's dimensions and added with weight 1.
    `loss` (camera-ready) sends its gradient into the encoder and the RSSM; `diagnostic` (HEAD's
    state_diagnostics) stops it at the features, so that only the head learns from it."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, reward_layers=2, state_heads=state_heads,
                       state_sizes={"position": 3, "velocity": 2})
    assert [len(head) for head in model.state_models.values()] == [5, 5]  # 2 hidden layers + output.
    assert [head[-1].out_features for head in model.state_models.values()] == [3, 2]
    assert model.state_models["position"][0].out_features == TINY_MODEL["reward_hidden_size"]
    obs, actions, rewards = torch.rand(5, 2, 3, 64, 64) - 0.5, torch.rand(5, 2, 2), torch.randn(5, 2)
    states = {"position": torch.randn(5, 2, 3), "velocity": torch.randn(5, 2, 2)}
    # The same weights without heads: the loss and the model's gradients without the state terms.
    plain = WorldModel(2, **TINY_MODEL, reward_layers=2)
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(4)
    plain_total, plain_terms = plain.loss(obs, actions, rewards)
    plain_total.backward()
    torch.manual_seed(4)
    total, terms = model.loss(obs, actions, rewards, states=states)
    total.backward()
    torch.manual_seed(4)
    beliefs, _, posteriors = model.rssm.observe(model.encoder(obs), actions, *model.rssm.initial(2, "cpu"))
    feature = torch.cat([posteriors.sample, beliefs], -1)
    for key, target in states.items():
        expected = -Normal(model.state_models[key](feature), 1.0).log_prob(target).sum(-1).mean()
        torch.testing.assert_close(terms[f"state_{key}"], expected.detach())
    torch.testing.assert_close(terms["total"], plain_terms["total"] + terms["state_position"] + terms["state_velocity"])
    assert all(p.grad.abs().sum() > 0 for p in model.state_models.parameters())
    for part in ("encoder", "rssm"):
        pairs = zip(getattr(model, part).parameters(), getattr(plain, part).parameters())
        grads = [(p.grad, q.grad) for p, q in pairs if q.grad is not None]
        same = all(torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7) for ours, theirs in grads)
        assert same == (state_heads == "diagnostic"), part


def test_reward_model_layers():
    """3 x 300 by default (HEAD); camera-ready's `feed_forward` is 2 x 100."""
    assert count(RewardModel()) == 230 * 300 + 300 + 2 * (300 * 300 + 300) + 300 + 1
    assert count(RewardModel(230, 100, layers=2)) == 230 * 100 + 100 + 100 * 100 + 100 + 100 + 1


def test_open_loop_prediction_uses_posteriors_then_prior(tiny_model):
    torch.manual_seed(0)
    obs, actions = torch.rand(8, 1, 3, 64, 64) - 0.5, torch.rand(8, 1, 2)
    context = 3

    def predict(frames):
        torch.manual_seed(5)
        return tiny_model.predict_open_loop(frames, actions, context=context)

    prediction = predict(obs)
    assert prediction.shape == (8, 1, 3, 64, 64)
    # Open loop: every frame after the context is never seen, so changing them changes nothing ...
    after = obs.clone()
    after[context:] = 0.4
    torch.testing.assert_close(predict(after), prediction, rtol=0, atol=0)
    # ... while the last context frame is filtered, and so changes its reconstruction and every
    # prediction after it.
    last = obs.clone()
    last[context - 1] = 0.4
    changed = (predict(last) - prediction).abs().amax((1, 2, 3, 4))
    assert (changed[:context - 1] == 0).all() and (changed[context - 1:] > 0).all()


def test_gru_variant_has_no_stochastic_path():
    """`--model gru`: the same inputs give the same features and open-loop rollouts, whatever the
    random stream, while the RSSM's differ."""
    obs, actions = torch.rand(6, 2, 3, 64, 64) - 0.5, torch.rand(6, 2, 2) * 2 - 1

    def features_and_rollout(model, seed):
        torch.manual_seed(seed)
        beliefs, _, posteriors = model.rssm.observe(model.encoder(obs), actions, *model.rssm.initial(2, "cpu"))
        imagined = model.rssm.imagine(actions, beliefs[-1], posteriors.sample[-1])
        return torch.cat([posteriors.sample, beliefs], -1), torch.cat(imagined, -1)

    torch.manual_seed(0)
    gru, rssm = WorldModel(2, **TINY_MODEL, model="gru"), WorldModel(2, **TINY_MODEL)
    for first, second in zip(features_and_rollout(gru, 1), features_and_rollout(gru, 2)):
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    for first, second in zip(features_and_rollout(rssm, 1), features_and_rollout(rssm, 2)):
        assert not torch.allclose(first, second)


def test_ssm_variant_has_no_deterministic_path():
    """`--model ssm`: no belief, and each prior is the transition of the previous sample and action
    alone: recomputed from those two with nothing else, it is the same Gaussian."""
    torch.manual_seed(0)
    model = WorldModel(2, **TINY_MODEL, model="ssm")
    ssm = model.rssm
    obs, actions = torch.rand(6, 2, 3, 64, 64) - 0.5, torch.rand(6, 2, 2) * 2 - 1
    beliefs, priors, posteriors = ssm.observe(model.encoder(obs), actions, *ssm.initial(2, "cpu"))
    assert beliefs.shape == (6, 2, 0) and ssm.feature_size == ssm.state_size
    nothing = torch.zeros(2, 0)
    for t in range(1, 6):
        _, prior = ssm.img_step(posteriors.sample[t - 1], actions[t], nothing)
        torch.testing.assert_close(prior.mean, priors.mean[t])
        torch.testing.assert_close(prior.std, priors.std[t])
