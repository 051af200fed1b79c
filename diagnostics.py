"""How well the world model predicts: a test episode's open-loop prediction (TensorBoard's image,
video_prediction.py's video) and the errors of its predictions `horizon` steps ahead, the steps the
planner looks ahead (the test's `test/*_mse_*` metrics).
"""
import torch

from model import features
from utils import postprocess_observation, preprocess_observation


@torch.no_grad()
def open_loop_prediction(model, episode, context=5, length=50, bit_depth=5):
    """Observe the first `context` observations of an episode, then predict up to `length` in all
    open loop from its executed actions. -> ground truth and prediction: uint8 frames
    `(T, 3, 64, 64)`, or float32 vectors `(T, obs_size)` from states. An episode that ended
    (terminated) within `context` steps is observed up to its last step."""
    device = next(model.parameters()).device
    context = min(context, len(episode["reward"]) - 1)
    obs = torch.as_tensor(episode["obs"][:length, None], device=device)
    actions = torch.as_tensor(episode["action"][:length, None], device=device)
    prediction = model.predict_open_loop(preprocess_observation(obs, bit_depth), actions, context)[:, 0]
    if not obs.is_floating_point():
        prediction = postprocess_observation(prediction, bit_depth)
    return episode["obs"][:length], prediction.cpu().numpy()


@torch.no_grad()
def open_loop_errors(model, episodes, horizon=12, stride=4, bit_depth=5, reward_offset=0):
    """How well the model predicts what the planner needs: rewards and images `horizon` steps ahead.

    Each episode is filtered with posteriors; from every `stride`-th step t the prior then predicts
    t+1 .. t+horizon open loop from the executed actions, as the planner's rollouts do. Returns
    mean squared errors over all those predictions:
    `reward_mse_open_loop`: the reward model on the open-loop states;
    `reward_mse_posterior`: the reward model on the posterior states of the same steps (closed loop);
    `reward_mse_constant`: always predicting the mean of those rewards (their variance), the level a
    reward model must beat before planning can use it;
    `image_mse_open_loop`: per pixel, the decoded open-loop mean against the preprocessed frame;
    `image_mse_constant`: per pixel, always predicting the mean of those frames (their variance),
    the level a model that has learnt the background but not the motion reaches;
    (from states, `observation_mse_open_loop` and `observation_mse_constant`, per dimension);
    (none of them when every episode is too short for `horizon` steps ahead);
    with state heads, per dimension of each part of the proprioceptive state:
    `state_<key>_mse_open_loop`, `state_<key>_mse_filtered` (posterior) and `state_<key>_mse_constant`.
    The reward model's target at step t is `reward[t + reward_offset]`: 1 when it predicts the
    reward that leaves each step (`--reward-alignment outgoing`).
    """
    device = next(model.parameters()).device
    sums, squares, counts = {}, {}, {}  # Per name: summed squared errors, and the targets' moments.

    def add(name, prediction, target):
        sums[name] = sums.get(name, 0.0) + (prediction - target).square().sum().item()
        counts[name] = counts.get(name, 0) + target.numel()

    def add_target(name, target):  # First and second moments per dimension, in float64.
        target = target.reshape(-1, *target.shape[2:]).double()
        first, second = squares.get(name, (0.0, 0.0))
        squares[name] = (first + target.sum(0), second + target.square().sum(0))

    for episode in episodes:
        if len(episode["reward"]) <= horizon + reward_offset:  # Ended (terminated) too early to predict.
            continue
        obs = preprocess_observation(torch.as_tensor(episode["obs"][:, None], device=device), bit_depth)
        actions = torch.as_tensor(episode["action"][:, None], device=device)
        rewards = torch.as_tensor(episode["reward"], device=device)
        beliefs, _, posteriors = model.rssm.observe(model.encoder(obs), actions,
                                                    *model.rssm.initial(1, device))
        starts = torch.arange(0, len(rewards) - horizon - reward_offset, stride, device=device)
        ahead = starts + torch.arange(1, horizon + 1, device=device)[:, None]  # (horizon, N)
        imagined_beliefs, imagined_states = model.rssm.imagine(actions[ahead, 0], beliefs[starts, 0],
                                                               posteriors.sample[starts, 0])
        imagined = features(imagined_beliefs, imagined_states)
        posterior = features(beliefs[ahead, 0], posteriors.sample[ahead, 0])
        target = rewards[ahead + reward_offset]
        add("reward_mse_open_loop", model.reward_model(imagined), target)
        add("reward_mse_posterior", model.reward_model(posterior), target)
        add_target("reward", target)
        name = model.observation_model.name
        add(f"{name}_mse_open_loop", model.observation_model(imagined), obs[ahead, 0])
        add_target(name, obs[ahead, 0])
        for key, head in model.state_models.items():
            state = torch.as_tensor(episode[f"state_{key}"], device=device)[ahead]
            add(f"state_{key}_mse_open_loop", head(imagined), state)
            add(f"state_{key}_mse_filtered", head(posterior), state)
            add_target(f"state_{key}", state)
    errors = {name: total / counts[name] for name, total in sums.items()}
    for name, (first, second) in squares.items():
        count = counts[f"{name}_mse_open_loop"] / first.numel()  # Targets per dimension.
        variance = second / count - (first / count).square()
        errors[f"{name}_mse_constant"] = variance.mean().item()
    return errors
