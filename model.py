"""PlaNet's world model (Hafner et al. 2019, Sec. 3 and Appendix A), sizes of the official code.

Notation: `belief` is the deterministic GRU state h_t, `state` the stochastic latent s_t,
`embed` the encoder's features e_t of the observation o_t. Shapes use T for time, B for batch.
The transition model is the paper's RSSM by default; `transition_model` also builds the two
designs it is compared with in Sec. 5 (Figure 4): the stochastic-only SSM and the deterministic GRU.
"""
import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tf_layers import GRU_CELLS, INITS, BlockGRUCell, glorot_init

MIN_STD = 0.1  # Lower bound of the latent std (official `rssm.py`).
LOG_2PI = math.log(2 * math.pi)


class Gaussian(NamedTuple):
    """A diagonal Gaussian over the latent state and one sample of it, each `(..., state_size)`."""

    mean: torch.Tensor
    std: torch.Tensor
    sample: torch.Tensor


def stack_gaussians(gaussians):
    """List of T `Gaussian`s of `(B, S)` -> one `Gaussian` of `(T, B, S)` (no samples if they
    have none)."""
    return Gaussian(*(None if field[0] is None else torch.stack(field) for field in zip(*gaussians)))


def gaussian_kl(q, p):
    """KL(q || p) between diagonal Gaussians, summed over the last dimension: `(...)`."""
    var_ratio = (q.std / p.std) ** 2
    mahalanobis = ((q.mean - p.mean) / p.std) ** 2
    return 0.5 * (var_ratio + mahalanobis - 1 - var_ratio.log()).sum(-1)


def gaussian_nll(target, mean, dims):
    """-log N(target | mean, 1), summed over the last `dims` dimensions, in nats."""
    squared = (target - mean).square()
    if dims:  # Sum first, then scale and shift once per sum rather than once per pixel.
        squared = squared.sum(dim=tuple(range(-dims, 0)))
    return 0.5 * squared + 0.5 * LOG_2PI * math.prod(target.shape[target.dim() - dims:])


_GPU_ORDER = [False]  # Set by `gpu_order`.


def cpu_order(device):
    """Whether ops on `device` run in the CPU's order. A CPU and a GPU want the same computation
    in two orders (docs/speed.md): a CPU's cost is memory, so it copies a strided half to run
    softplus 4-10x faster and sums the planner's rewards step by step while they are in cache; a
    GPU's cost is kernel launches, so it copies nothing and runs the reward model once on the
    stacked steps. This is the one switch between them."""
    return device.type == "cpu" and not _GPU_ORDER[0]


@contextlib.contextmanager
def gpu_order():
    """Run the GPU's order on any device: how bench.py counts a GPU's launches on a CPU."""
    _GPU_ORDER[0] = True
    try:
        yield
    finally:
        _GPU_ORDER[0] = False


def masked_mean(x, valid):
    """Mean of `x (T, B)` over the rows where `valid (T, 1)` holds, or the elements where
    `valid (T, B)` does."""
    return (x * valid).sum() / (valid.sum() * (x.shape[1] if valid.shape[1] == 1 else 1))


def average(x, valid=None):
    """Mean of `x (T, B)` over every step, or over the valid ones of a padded chunk (`valid`
    `(T, B)` of 0 and 1). Without padding it is the plain mean, bit for bit."""
    return x.mean() if valid is None else masked_mean(x, valid)


def conv_autocast(device, enabled):
    """bf16 autocast for the conv nets (`--bf16`), or nothing. Their outputs go back to float32 so
    that the RSSM, the KL and the sums of the log-likelihoods stay in float32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=enabled)


class Encoder(nn.Module):
    """`(..., 3, 64, 64)` image in [-0.5, 0.5] -> `(..., 32 * depth)` embed (1024 by default).
    With `bf16`, the convs run under bf16 autocast and the embed comes back in float32."""

    def __init__(self, depth=32, bf16=False):
        super().__init__()
        self.embed_size = 32 * depth
        self.bf16 = bf16
        self.convs = nn.Sequential(
            nn.Conv2d(3, depth, 4, stride=2), nn.ReLU(),
            nn.Conv2d(depth, 2 * depth, 4, stride=2), nn.ReLU(),
            nn.Conv2d(2 * depth, 4 * depth, 4, stride=2), nn.ReLU(),
            nn.Conv2d(4 * depth, 8 * depth, 4, stride=2), nn.ReLU(),
        )

    def forward(self, obs):
        batch_shape = obs.shape[:-3]
        with conv_autocast(obs.device, self.bf16):
            embed = self.convs(obs.reshape(-1, *obs.shape[-3:]))
        return embed.float().reshape(*batch_shape, self.embed_size)


def gaussian_layer(in_size, state_size):
    """The linear layer of a Gaussian's mean and pre-softplus std, `(..., in)` -> `(..., 2 S)`:
    one layer where the official code has two (`glorot_init` treats it as two)."""
    layer = nn.Linear(in_size, 2 * state_size)
    layer.gaussian_parameters = True
    return layer


def gaussian(params, mean_only=False, noise=None, sample=True):
    """Split `(..., 2 * S)` into the mean and the pre-softplus std of a diagonal Gaussian and draw
    one sample: the mean itself when `mean_only` (official `mean_only`), else mean + std * `noise`,
    the noise drawn here unless given. With `sample` False it draws nothing, and `sample` is None."""
    mean, std = params.chunk(2, dim=-1)
    if cpu_order(std.device):
        std = std.contiguous()
    std = F.softplus(std) + MIN_STD
    if not sample:
        return Gaussian(mean, std, None)
    if mean_only:
        return Gaussian(mean, std, mean)
    return Gaussian(mean, std, torch.addcmul(mean, std, torch.randn_like(std) if noise is None else noise))


def input_columns(layer, size):
    """The weight `(out, in)` of a layer that reads two inputs concatenated, as the columns that
    read the first `size` inputs and those that read the rest: views, so the state dict is the
    layer's own. Applying them apart spares the `cat`, and lets a sequence's second input go
    through in one matmul over all its steps."""
    return layer.weight[:, :size], layer.weight[:, size:]


class TransitionModel(nn.Module):
    """The interface of a latent transition model: all that the loss, the planner, the agent and
    the open-loop predictions use. A subclass defines `img_step` and `obs_step`:

    img_step(state, action, belief, noise=None) -> belief, prior      one step of p(s_t | s_<t, a_<t)
    obs_step(state, action, belief, embed) -> belief, prior, posterior    q(s_t | ..., o_t)

    with `state (B, S)` the previous sample, `action (B, A)` the action that led to step t and
    `belief (B, belief_size)` the deterministic part, which is empty (size 0) in a model without one;
    the prior's sample is mean + std * `noise (B, S)`, drawn if not given.
    """

    action_size: int
    belief_size: int
    state_size: int
    mean_only = False  # Samples are means (the GRU of Figure 4).

    @property
    def feature_size(self):
        return self.belief_size + self.state_size

    def initial(self, batch_size, device):
        """Zero belief `(B, belief_size)` and zero state `(B, state_size)`."""
        return (torch.zeros(batch_size, self.belief_size, device=device),
                torch.zeros(batch_size, self.state_size, device=device))

    def observe(self, embeds, actions, belief, state):
        """Filter a sequence. `embeds (T, B, E)`, `actions (T, B, A)` where `actions[t]` led to
        the observation of `embeds[t]`. -> beliefs `(T, B, H)`, priors and posteriors `(T, B, S)`.
        Posterior samples are fed forward, as in training and acting; the priors are not sampled."""
        beliefs, priors, posteriors = [], [], []
        # `unbind`, not indexing, whose backward would be one scatter into zeros per step.
        for embed, action in zip(embeds.unbind(0), actions.unbind(0)):
            belief, prior, posterior = self.obs_step(state, action, belief, embed)
            state = posterior.sample
            beliefs.append(belief)
            priors.append(prior)
            posteriors.append(posterior)
        return torch.stack(beliefs), stack_gaussians(priors), stack_gaussians(posteriors)

    def imagine(self, actions, belief, state):
        """Open-loop rollout with prior samples. `actions (T, B, A)` -> beliefs `(T, B, H)`,
        states `(T, B, S)`."""
        noise = self.prior_noise(actions)
        beliefs, states = [], []
        for t, action in enumerate(actions.unbind(0)):
            belief, prior = self.img_step(state, action, belief, None if noise is None else noise[t])
            state = prior.sample
            beliefs.append(belief)
            states.append(state)
        return torch.stack(beliefs), torch.stack(states)

    def prior_noise(self, actions):
        """The noise of the prior samples of a rollout of `actions (T, B, A)`, `(T, B, S)`, drawn
        at once (one launch, not T); None for a model whose samples are their means."""
        if self.mean_only:
            return None
        return torch.randn(*actions.shape[:2], self.state_size, device=actions.device)


class RSSM(TransitionModel):
    """Recurrent state-space model: deterministic belief h_t plus stochastic state s_t (Sec. 3).

    img_step (prior):       h_t = GRU(relu(W[s_{t-1}, a_{t-1}]), h_{t-1}),  s_t ~ p(s_t | h_t)
    obs_step (posterior):   the prior step, then s_t ~ q(s_t | h_t, e_t)

    With `mean_only`, every "sample" is its mean: the deterministic model of Figure 4 (`--model gru`,
    official `mean_only`). The KL still compares the two Gaussians and so pulls the posterior's mean
    towards the prior's, but nothing random reaches the features.
    """

    def __init__(self, action_size, belief_size=200, state_size=30, hidden_size=200, embed_size=1024,
                 mean_only=False, gru_cell="torch"):
        super().__init__()
        self.action_size, self.belief_size, self.state_size = action_size, belief_size, state_size
        self.mean_only = mean_only
        self.fc_state_action = nn.Linear(state_size + action_size, hidden_size)
        cell = BlockGRUCell if gru_cell == "block" else nn.GRUCell
        self.gru = cell(hidden_size, belief_size)
        self.fc_prior_hidden = nn.Linear(belief_size, hidden_size)
        self.fc_prior = gaussian_layer(hidden_size, state_size)
        self.fc_posterior_hidden = nn.Linear(belief_size + embed_size, hidden_size)
        self.fc_posterior = gaussian_layer(hidden_size, state_size)

    def img_step(self, state, action, belief, noise=None):
        """One prior step: `(B, S)`, `(B, A)`, `(B, H)` -> belief `(B, H)`, prior `Gaussian`."""
        belief = self._recur(self.fc_state_action(torch.cat([state, action], dim=-1)), belief)
        return belief, self.prior(belief, noise)

    def obs_step(self, state, action, belief, embed):
        """Prior step, then condition on the embed `(B, E)`: -> belief, prior (not sampled),
        posterior."""
        belief = self._recur(self.fc_state_action(torch.cat([state, action], dim=-1)), belief)
        posterior = self._posterior(self.fc_posterior_hidden(torch.cat([belief, embed], dim=-1)))
        return belief, self.prior(belief, sample=False), posterior

    def prior(self, belief, noise=None, sample=True):
        """p(s_t | h_t) of beliefs of any batch shape `(..., H)`, sampled with `noise` if given."""
        return gaussian(self.fc_prior(F.relu(self.fc_prior_hidden(belief))), self.mean_only, noise, sample)

    def _recur(self, x, belief):
        """h_t = GRU(relu(x), h_{t-1}), with x = W [s_{t-1}, a_{t-1}] + b the input layer's output."""
        return self.gru(F.relu(x), belief)

    def _posterior(self, x):
        """q(s_t | h_t, e_t), with x = W [h_t, e_t] + b its first layer's output."""
        return gaussian(self.fc_posterior(F.relu(x)), self.mean_only)

    # The filter and the rollout compute what `obs_step` and `img_step` do, step by step, with
    # fewer kernel launches (a GPU's cost, docs/speed.md): the actions' (and embeds') columns of
    # the input layers run as one matmul over all T steps, so a step's input layer is one `addmm`
    # with no `cat`; the filter's priors, which nothing in the loop reads, run once on all T
    # beliefs after it; the rollout draws the noise of its T samples at once.

    def observe(self, embeds, actions, belief, state):
        """`TransitionModel.observe`: `obs_step` over the T steps, in fewer launches."""
        state_weight, action_weight = input_columns(self.fc_state_action, self.state_size)
        belief_weight, embed_weight = input_columns(self.fc_posterior_hidden, self.belief_size)
        action_inputs = F.linear(actions, action_weight, self.fc_state_action.bias)  # (T, B, hidden)
        embed_inputs = F.linear(embeds, embed_weight, self.fc_posterior_hidden.bias)
        beliefs, posteriors = [], []
        for action_input, embed_input in zip(action_inputs.unbind(0), embed_inputs.unbind(0)):
            belief = self._recur(torch.addmm(action_input, state, state_weight.t()), belief)
            posterior = self._posterior(torch.addmm(embed_input, belief, belief_weight.t()))
            state = posterior.sample
            beliefs.append(belief)
            posteriors.append(posterior)
        beliefs = torch.stack(beliefs)
        return beliefs, self.prior(beliefs, sample=False), stack_gaussians(posteriors)

    def imagine(self, actions, belief, state):
        """`TransitionModel.imagine`: `img_step` over the T steps, in fewer launches."""
        state_weight, action_weight = input_columns(self.fc_state_action, self.state_size)
        action_inputs = F.linear(actions, action_weight, self.fc_state_action.bias)
        noise = self.prior_noise(actions)
        beliefs, states = [], []
        for t, action_input in enumerate(action_inputs.unbind(0)):
            belief = self._recur(torch.addmm(action_input, state, state_weight.t()), belief)
            state = self.prior(belief, None if noise is None else noise[t]).sample
            beliefs.append(belief)
            states.append(state)
        return torch.stack(beliefs), torch.stack(states)


class SSM(TransitionModel):
    """State-space model with purely stochastic transitions (Figure 2b; official `models/ssm.py`):

    img_step (prior):       s_t ~ p(s_t | s_{t-1}, a_{t-1}), one hidden layer
    obs_step (posterior):   s_t ~ q(s_t | prior mean and std, e_t), one hidden layer

    There is no belief: it is `(B, 0)`, passed through unchanged, so the features are s_t alone
    and whatever the model remembers must pass through the samples.
    """

    def __init__(self, action_size, state_size=30, hidden_size=200, embed_size=1024):
        super().__init__()
        self.action_size, self.belief_size, self.state_size = action_size, 0, state_size
        self.fc_transition_hidden = nn.Linear(state_size + action_size, hidden_size)
        self.fc_transition = gaussian_layer(hidden_size, state_size)
        self.fc_posterior_hidden = nn.Linear(2 * state_size + embed_size, hidden_size)
        self.fc_posterior = gaussian_layer(hidden_size, state_size)

    def img_step(self, state, action, belief, noise=None):
        """One prior step: `(B, S)`, `(B, A)`, empty `(B, 0)` -> the same belief, prior `Gaussian`."""
        return belief, self._transition(state, action, noise)

    def obs_step(self, state, action, belief, embed):
        """Prior step (not sampled), then condition on the embed `(B, E)`: -> belief, prior, posterior."""
        prior = self._transition(state, action, sample=False)
        hidden = F.relu(self.fc_posterior_hidden(torch.cat([prior.mean, prior.std, embed], dim=-1)))
        return belief, prior, gaussian(self.fc_posterior(hidden))

    def _transition(self, state, action, noise=None, sample=True):
        hidden = F.relu(self.fc_transition_hidden(torch.cat([state, action], dim=-1)))
        return gaussian(self.fc_transition(hidden), noise=noise, sample=sample)


MODELS = ("rssm", "ssm", "gru")


def transition_model(name, action_size, belief_size=200, state_size=30, hidden_size=200, embed_size=1024,
                     gru_cell="torch"):
    """The transition model `name` of MODELS: `rssm` (PlaNet), `ssm` (stochastic only; it has no
    belief, so `belief_size` and `gru_cell` are unused) or `gru` (deterministic only: the RSSM with
    mean samples). `gru_cell` is one of GRU_CELLS."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if name == "ssm":
        return SSM(action_size, state_size, hidden_size, embed_size)
    return RSSM(action_size, belief_size, state_size, hidden_size, embed_size, mean_only=name == "gru",
                gru_cell=gru_cell)


def features(belief, state):
    """The input of the heads: `[s_t, h_t]`, `(..., S + H)` (`s_t` alone when H is 0)."""
    return torch.cat([state, belief], dim=-1)


class ObservationModel(nn.Module):
    """Features `(..., F)` -> mean of N(o_t, 1), `(..., 3, 64, 64)`. With `bf16`, the layers run
    under bf16 autocast and the image comes back in float32."""

    name = "image"  # Of its loss term and test errors.

    def __init__(self, feature_size=230, depth=32, bf16=False):
        super().__init__()
        self.embed_size = 32 * depth
        self.bf16 = bf16
        self.fc = nn.Linear(feature_size, self.embed_size)  # No activation (official).
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(self.embed_size, 4 * depth, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(2 * depth, depth, 6, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(depth, 3, 6, stride=2),
        )

    def forward(self, feature):
        batch_shape = feature.shape[:-1]
        with conv_autocast(feature.device, self.bf16):
            hidden = self.fc(feature).reshape(-1, self.embed_size, 1, 1)
            image = self.deconvs(hidden)
        return image.float().reshape(*batch_shape, 3, 64, 64)


def dense_head(feature_size, hidden_size, layers, out_size):
    """`layers` hidden layers of `hidden_size` with ReLU, then a linear layer to `out_size`: the
    official `feed_forward` (`networks/basic.py:26-38` at `0c6f7d3`)."""
    sizes = [feature_size] + [hidden_size] * layers
    hidden = [module for i in range(layers) for module in (nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU())]
    return nn.Sequential(*hidden, nn.Linear(sizes[-1], out_size))


# From states (`--obs state`), MLPs take the conv nets' places: Kaixhin/PlaNet's `SymbolicEncoder`
# and `SymbolicObservationModel` (`models.py`, commit 016520f), two hidden ReLU layers of the
# embed size each, 1024 by default as for pixels. The official code learns from pixels only.

class VectorEncoder(nn.Module):
    """`(..., obs_size)` observation vector -> `(..., embed_size)` embed."""

    def __init__(self, obs_size, embed_size=1024):
        super().__init__()
        self.embed_size = embed_size
        self.net = dense_head(obs_size, embed_size, 2, embed_size)

    def forward(self, obs):
        return self.net(obs)


class VectorObservationModel(nn.Module):
    """Features `(..., F)` -> mean of N(o_t, I), `(..., obs_size)`: a unit Gaussian on the vector."""

    name = "observation"  # Of its loss term and test errors.

    def __init__(self, feature_size, obs_size, hidden_size=1024):
        super().__init__()
        self.net = dense_head(feature_size, hidden_size, 2, obs_size)

    def forward(self, feature):
        return self.net(feature)


class ContinueModel(nn.Module):
    """Features `(..., F)` -> the logit of a Bernoulli "the episode is still running" at this
    step, `(...)`: Dreamer's discount predictor (Hafner et al. 2020; danijar/dreamer `pcont`,
    `dreamer.py` at 399cad5), an extension beyond PlaNet for envs that terminate. The reward
    model's shape."""

    def __init__(self, feature_size=230, hidden_size=300, layers=3):
        super().__init__()
        self.net = dense_head(feature_size, hidden_size, layers, 1)

    def forward(self, feature):
        return self.net(feature).squeeze(-1)


class RewardModel(nn.Module):
    """Features `(..., F)` -> mean of N(r_t, 1), `(...)`. Three hidden layers of 300 by default
    (HEAD `c04226b`, `scripts/configs.py:110-116`); camera-ready `0c6f7d3` has two of 100
    (`--reward-layers 2 --reward-hidden-size 100`), and the paper's text two of 200."""

    def __init__(self, feature_size=230, hidden_size=300, layers=3):
        super().__init__()
        self.net = dense_head(feature_size, hidden_size, layers, 1)

    def forward(self, feature):
        return self.net(feature).squeeze(-1)


STATE_HEADS = ("none", "diagnostic", "loss")


class WorldModel(nn.Module):
    """The four networks (and any state heads) trained together; one `state_dict` holds them all.
    From pixels, the conv `Encoder` and `ObservationModel`; given `obs_size`, from observation
    vectors of that size (`--obs state`), MLPs of width `embed_size` instead (`VectorEncoder`,
    `VectorObservationModel`). `rssm` is the
    transition model: PlaNet's RSSM, or with `model` one of the designs of Figure 4 (MODELS),
    which share its interface (`TransitionModel`). `gru_cell` (GRU_CELLS) and `init` (INITS) choose
    between PyTorch's GRU and initialisation and the official TensorFlow ones. `bf16` runs the
    encoder and the decoder under bf16 autocast (`--bf16`), a setting of the computation, not of
    the weights.

    `state_heads` (STATE_HEADS) adds, for each part of the env's proprioceptive observation
    (`state_sizes`, e.g. `{"position": 3, "velocity": 2}`), a head of the reward model's shape that
    predicts it from the features, N(mean, 1): `loss` trains the model through them, as camera-ready
    `0c6f7d3` does (`scripts/configs.py:114-116`, `feed_forward` with `cut_gradient=False`);
    `diagnostic` stops their gradient at the features, as HEAD `c04226b`'s `state_diagnostics`
    means to (`scripts/configs.py:169-174`; as shipped its graph cannot be built, see
    docs/faithfulness.md, note 3), so that they only read how much of the state the latent holds.
    """

    def __init__(self, action_size, belief_size=200, state_size=30, hidden_size=200,
                 cnn_depth=32, reward_hidden_size=300, model="rssm", bf16=False, gru_cell="torch",
                 init="torch", reward_layers=3, state_heads="none", state_sizes=None, obs_size=None,
                 embed_size=1024, termination_head=False):
        super().__init__()
        if gru_cell not in GRU_CELLS or init not in INITS or state_heads not in STATE_HEADS:
            raise ValueError(f"gru_cell must be one of {GRU_CELLS}, init one of {INITS} and "
                             f"state_heads one of {STATE_HEADS}")
        if state_heads != "none" and not state_sizes:
            raise ValueError("state heads need the sizes of the env's proprioceptive observation")
        self.encoder = Encoder(cnn_depth, bf16) if obs_size is None else VectorEncoder(obs_size, embed_size)
        self.rssm = transition_model(model, action_size, belief_size, state_size, hidden_size,
                                     self.encoder.embed_size, gru_cell)
        self.observation_model = (ObservationModel(self.rssm.feature_size, cnn_depth, bf16) if obs_size is None
                                  else VectorObservationModel(self.rssm.feature_size, obs_size, embed_size))
        self.reward_model = RewardModel(self.rssm.feature_size, reward_hidden_size, reward_layers)
        self.state_heads = state_heads
        self.state_models = nn.ModuleDict({
            key: dense_head(self.rssm.feature_size, reward_hidden_size, reward_layers, size)
            for key, size in (state_sizes or {}).items()} if state_heads != "none" else {})
        self.continue_model = (ContinueModel(self.rssm.feature_size, reward_hidden_size, reward_layers)
                               if termination_head else None)
        if init == "glorot":
            glorot_init(self)

    def loss(self, obs, actions, rewards, free_nats=3.0, reward_scale=10.0, overshooting_distance=0,
             overshooting_kl_beta=1.0, overshooting_reward_scale=0.0, global_kl_beta=0.0, states=None,
             terminal=None, valid=None, continue_scale=10.0):
        """The negative ELBO of Eq. 3, averaged over batch and time, plus the options of the
        official code: latent overshooting (Eq. 7) of the KL up to `overshooting_distance`, weighted
        by `overshooting_kl_beta`, and of the reward, weighted by `overshooting_reward_scale`; and
        the global KL prior, KL(posterior || N(0, I)) weighted by `global_kl_beta`.

        obs `(T, B, 3, 64, 64)` preprocessed, or `(T, B, obs_size)` vectors, actions `(T, B, A)` with `actions[t]` the action that
        led to `obs[t]`, rewards `(T, B)` received on that transition, and with state heads the
        proprioceptive `states` `{key: (T, B, size)}`, each a term `state_<key>` of weight 1
        (official), whose gradient reaches only its head when they are diagnostics.

        Chunks of an env that ends early are padded past its end (`ReplayBuffer`): then `valid`
        `(T, B)` marks the steps inside the episode, every term averages over those alone, and
        `terminal` `(T, B)` marks where it terminated, the target of the continue model (a
        Bernoulli of "still running", weighted by `continue_scale`, Dreamer's 10).
        Returns the total to minimise and a dict of detached terms, each in nats.
        """
        belief, state = self.rssm.initial(obs.shape[1], obs.device)
        beliefs, priors, posteriors = self.rssm.observe(self.encoder(obs), actions, belief, state)
        feature = features(beliefs, posteriors.sample)
        observation_nll = average(gaussian_nll(obs, self.observation_model(feature), dims=obs.dim() - 2), valid)
        reward_nll = average(gaussian_nll(rewards, self.reward_model(feature), dims=0), valid)
        # KL(posterior || prior) with free nats per (t, b) element; gradients reach both sides.
        kl = gaussian_kl(posteriors, priors)
        kl_loss = average((kl - free_nats).clamp(min=0), valid)
        total = observation_nll + reward_scale * reward_nll + kl_loss
        terms = {self.observation_model.name: observation_nll, "reward": reward_nll, "kl": average(kl, valid),
                 "kl_free": kl_loss}
        head_inputs = feature if self.state_heads == "loss" else feature.detach()
        for key, head in self.state_models.items():
            terms[f"state_{key}"] = average(gaussian_nll(states[key], head(head_inputs), dims=1), valid)
            total = total + terms[f"state_{key}"]
        if self.continue_model is not None and terminal is not None:
            running = 1 - terminal
            terms["continue"] = average(F.binary_cross_entropy_with_logits(
                self.continue_model(feature), running, reduction="none"), valid)
            total = total + continue_scale * terms["continue"]
        if global_kl_beta > 0:  # No free nats (camera-ready `training/utility.py`).
            unit = Gaussian(torch.zeros_like(posteriors.mean), torch.ones_like(posteriors.std), None)
            terms["global_kl"] = average(gaussian_kl(posteriors, unit), valid)
            total = total + global_kl_beta * terms["global_kl"]
        if overshooting_distance >= 2:  # d = 1 is the KL above; overshooting adds d = 2..D.
            overshooting_kl, overshooting_reward = self._overshooting(
                beliefs, posteriors, actions, rewards, overshooting_distance, free_nats,
                with_reward=overshooting_reward_scale > 0, valid=valid)
            total = total + overshooting_kl_beta * overshooting_kl
            terms["overshooting_kl"] = overshooting_kl
            if overshooting_reward is not None:
                total = total + overshooting_reward_scale * overshooting_reward
                terms["overshooting_reward"] = overshooting_reward
        terms["total"] = total
        return total, {name: value.detach() for name, value in terms.items()}

    def _overshooting(self, beliefs, posteriors, actions, rewards, distance, free_nats, with_reward, valid=None):
        """Latent overshooting (Sec. 4, Eq. 7) as the official code computes it (`[:, :, 1:-1]` of
        `tools/overshooting.py` in `training/utility.py`): from each start, predict d = 1..D steps
        open loop with the prior and match the prior at each d = 2..D to the posterior there,
        whose gradient is stopped. d = 1 is left out: it is the one-step KL the loss already has.
        `with_reward`: also the reward model's NLL on those open-loop states (the first official
        release's reward overshooting), else None.

        Column c of `(T, B)` starts from the posterior at c - 1, and column 0 from the initial
        zero state, as the filter does; step d of column c takes `actions[c + d - 1]` and its
        target is the posterior (and reward) at c + d - 1. Pairs whose target lies past the chunk
        are masked, and in a padded chunk those whose target is padding (`valid` `(T, B)`). Free
        nats apply per element of the KL; each term is the mean over the valid pairs of each d,
        then over d. Every column is rolled out in one batch of `(T * B)`.
        """
        steps, batch = actions.shape[:2]
        belief, state = (torch.cat([start[None], x[:-1]]).reshape(steps * batch, -1) for start, x in
                         zip(self.rssm.initial(batch, actions.device), (beliefs, posteriors.sample)))
        column = torch.arange(steps, device=actions.device)
        kls, reward_nlls = [], []
        for d in range(1, min(distance, steps) + 1):
            target = (column + d - 1).clamp(max=steps - 1)  # Targets past the end are masked below.
            action = actions[target].reshape(steps * batch, -1)
            belief, prior = self.rssm.img_step(state, action, belief)
            state = prior.sample
            if d == 1:
                continue
            pairs = (column + d <= steps).unsqueeze(1)
            if valid is not None:
                pairs = pairs * valid[target]
            posterior = Gaussian(*(x[target].reshape(steps * batch, -1).detach() for x in posteriors))
            kl = gaussian_kl(posterior, prior).reshape(steps, batch)
            kls.append(masked_mean((kl - free_nats).clamp(min=0), pairs))
            if with_reward:
                predicted = self.reward_model(features(belief, state)).reshape(steps, batch)
                reward_nlls.append(masked_mean(gaussian_nll(rewards[target], predicted, dims=0), pairs))
        return torch.stack(kls).mean(), torch.stack(reward_nlls).mean() if with_reward else None

    @torch.no_grad()
    def predict_open_loop(self, obs, actions, context):
        """Reconstruct the first `context` frames from posteriors, then predict the rest open loop
        from the actions. `obs (T, B, 3, 64, 64)` preprocessed (or `(T, B, obs_size)`), `actions
        (T, B, A)` aligned as in `loss`. -> predicted means, `obs`'s shape."""
        belief, state = self.rssm.initial(obs.shape[1], obs.device)
        beliefs, _, posteriors = self.rssm.observe(self.encoder(obs[:context]), actions[:context],
                                                   belief, state)
        imagined_beliefs, imagined_states = self.rssm.imagine(actions[context:], beliefs[-1],
                                                              posteriors.sample[-1])
        feature = torch.cat([features(beliefs, posteriors.sample),
                             features(imagined_beliefs, imagined_states)])
        return self.observation_model(feature)
