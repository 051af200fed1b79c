"""The official code's TensorFlow layers in PyTorch, as options (`--gru-cell block`, `--init glorot`).

The official RSSM (`models/rssm.py:54` at camera-ready `0c6f7d3`, `:55` at HEAD `c04226b`) uses
TensorFlow's `GRUBlockCell`, and every `tf.layers` layer there gets TensorFlow's default
initialisation. PyTorch's `nn.GRUCell` and initialisation differ in both; these reproduce them.
"""
import torch
from torch import nn


class BlockGRUCell(nn.Module):
    """The GRU of the official RSSM, TensorFlow's `GRUBlockCell` (`--gru-cell block`):

    [r, u] = sigmoid(W_ru [x, h] + b_ru),   c = tanh(W_c [x, r * h] + b_c),   h' = u * h + (1 - u) * c

    The reset gate acts before the recurrent product, and there is one bias per gate, starting at
    1 for the gates and 0 for the candidate; kernels are Glorot-uniform over `[x, h]`, TensorFlow's
    default. `nn.GRUCell` (`--gru-cell torch`) applies r after the product and has two biases.
    `(B, input_size)`, `(B, hidden_size)` -> `(B, hidden_size)`.
    """

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.gates = nn.Linear(input_size + hidden_size, 2 * hidden_size)
        self.candidate = nn.Linear(input_size + hidden_size, hidden_size)
        for layer, bias in ((self.gates, 1.0), (self.candidate, 0.0)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, bias)

    def forward(self, x, h):
        reset, update = torch.sigmoid(self.gates(torch.cat([x, h], -1))).chunk(2, -1)
        candidate = torch.tanh(self.candidate(torch.cat([x, reset * h], -1)))
        return update * h + (1 - update) * candidate


GRU_CELLS = ("torch", "block")
INITS = ("torch", "glorot")


def glorot_init(model):
    """TensorFlow's default initialisation, as the official `tf.layers` get it (`--init glorot`):
    Glorot-uniform kernels and zero biases for every linear and conv layer. A layer that holds a
    Gaussian's mean and std `(2 S)` is initialised as the official two layers of S. The GRU cell
    keeps its own initialisation (`nn.GRUCell`'s, or `BlockGRUCell`'s, which is TensorFlow's)."""
    cells = {id(p) for m in model.modules() if isinstance(m, (nn.GRUCell, BlockGRUCell))
             for p in m.parameters()}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) or id(module.weight) in cells:
            continue
        halves = 2 if getattr(module, "gaussian_parameters", False) else 1
        with torch.no_grad():
            for half in module.weight.chunk(halves):
                half.copy_(nn.init.xavier_uniform_(torch.empty_like(half)))
        nn.init.zeros_(module.bias)
