"""One CUDA graph per input shape: the speed paths' way to launch thousands of small kernels at once.

PlaNet's planner and update are chains of thousands of small kernels (the RSSM steps one by one,
12 x 10 of them per CEM call, 50 forward and back per update). Eager, on an H200, the Python and
launch overhead of each op is the whole cost: 69 ms per CEM call and 132 ms per update, the GPU
idle nearly all the time (docs/speed.md). Replaying them as one CUDA graph costs one launch.

We capture by hand (`torch.cuda.graph`) rather than with Inductor's CUDA graph trees
(`mode="reduce-overhead"`): on torch 2.11 the trees failed an internal assertion on our planner
(pytorch/pytorch PR #175562 turned it into a warning in later versions), and the capture here
is small enough to read.
"""
import weakref
from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

WARMUP_CALLS = 2  # Before capture: compiling, cuBLAS's workspaces and Triton's tuning happen here.
# Every graph captured in this process, kept until it ends. Capture streams come from a pool of 32,
# so two graphs may share one, and on torch 2.13 destroying a graph frees the cuBLAS workspace of
# its capture stream, which the other still uses (pytorch/pytorch#193402): a bench of several
# variants, or a test, drops its graphs while others live.
_CAPTURED = []


def signature(value):
    """A leaf of a call's arguments as part of its graph's key: a tensor by its shape, dtype and
    device (the graph reads its values), a module by itself, weakly, and its mode, anything else
    (a float) by itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, torch.nn.Module):
        return ModuleKey(value)
    return value


class ModuleKey:
    """A module and its mode in a graph's key, held by a weak reference, so that a planner's graphs
    keep no model alive (its graph's memory stays, `_CAPTURED`). Once the module is gone the key
    equals no other: a new module at its address gets graphs of its own."""

    def __init__(self, module):
        self.module, self.training, self.address = weakref.ref(module), module.training, id(module)

    def __hash__(self):
        return hash((self.address, self.training))

    def __eq__(self, other):
        return (isinstance(other, ModuleKey) and self.training == other.training
                and self.module() is not None and self.module() is other.module())


class CUDAGraphed:
    """`fn(*args, **kwargs)` replayed from a CUDA graph, one per distinct call signature.

    At the first call with a signature the inputs' tensors are copied into static buffers, `fn`
    runs `WARMUP_CALLS` times on a side stream and is then captured. Each call copies its
    tensors into the buffers, replays, and returns copies of the outputs (the next replay writes
    over the graph's own). Everything else in the arguments (modules, numbers) is part of the
    key (a module weakly: `ModuleKey`), so a graph never sees other weights or settings:
    parameters are read in place, and optimizer steps and `load_state_dict` update them where the
    graph reads them.

    Random draws use the default CUDA generator, which graphs replay with fresh numbers: the
    generator's state is put back after warm-up and capture, so that a seed gives `fn`'s eager
    draws, call after call.

    `fn` must not sync with the host (no `.item()`, no data-dependent shapes), which capture
    refuses.
    """

    def __init__(self, fn):
        self.fn = fn
        self.graphs = {}  # key -> Graph.

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (str(spec), tuple(signature(leaf) for leaf in leaves))
        if key not in self.graphs:
            self.graphs[key] = self.capture(leaves, spec)
        graph = self.graphs[key]
        for static, leaf in zip(graph.inputs, leaves):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf)
        graph.graph.replay()
        self.after_replay(graph)
        return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, graph.outputs)

    def capture(self, leaves, spec):
        # Static copies of the tensors; the rest (modules, numbers) is passed as given, not kept.
        inputs = [leaf.detach().clone() if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        device = next(leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor))
        args, kwargs = pytree.tree_unflatten([leaf if static is None else static
                                              for static, leaf in zip(inputs, leaves)], spec)
        call = lambda: self.fn(*args, **kwargs)
        with torch.cuda.device(device):  # The generator that capture registers is this device's.
            rng = torch.cuda.get_rng_state(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    call()
                    self.before_capture()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # A stream of its own: on torch 2.13 destroying a graph frees the cuBLAS workspace of
            # its capture stream, which graphs captured on the same (default) stream still use
            # (pytorch/pytorch#193402). thread_local: the replay's prefetching thread may copy the
            # next batch meanwhile, on its own stream and pool.
            stream = torch.cuda.Stream(device)
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    outputs = call()
            finally:
                torch.cuda.set_rng_state(rng, device)
        _CAPTURED.append(graph)
        return Graph(graph, stream, inputs, outputs, self.captured_state())

    def before_capture(self):
        """Undo what a warm-up call leaves that the capture must not see (`CapturedGradients`)."""

    def captured_state(self):
        """What else the capture made that each replay must find in place (`CapturedGradients`)."""

    def after_replay(self, graph):
        """Put `graph.state` back in place (`CapturedGradients`)."""


class Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    stream: torch.cuda.Stream  # Its capture stream, kept as long as the graph.
    inputs: list  # The static copies of the call's tensors, None for its other leaves.
    outputs: object  # What the captured call returned, which each replay overwrites.
    state: object


class CapturedGradients(CUDAGraphed):
    """`loss_fn(*args) -> (loss, terms)` and `loss.backward()` as one CUDA graph per batch shape:
    a call leaves the gradients in the parameters' `.grad`, as eager zeroing and backward do.

    The gradients live in the graph's memory, where each replay writes them: a warm-up call's are
    dropped before capture (else the captured backward would add to them), and each call puts
    the graph's tensors back in `.grad`, in case something set them to None in between.
    """

    def __init__(self, loss_fn, parameters):
        super().__init__(self.loss_and_gradients)
        self.loss_fn = loss_fn
        self.parameters = list(parameters)

    def loss_and_gradients(self, *args):
        loss, terms = self.loss_fn(*args)
        loss.backward()
        return loss.detach(), terms

    def capture(self, leaves, spec):
        self.before_capture()
        return super().capture(leaves, spec)

    def before_capture(self):
        for parameter in self.parameters:
            parameter.grad = None

    def captured_state(self):
        return [parameter.grad for parameter in self.parameters]

    def after_replay(self, graph):
        for parameter, gradient in zip(self.parameters, graph.state):
            parameter.grad = gradient
