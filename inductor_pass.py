"""An Inductor graph pass of the compiled planner on a CPU (`--compile-planner`, `--capture-planner`).

In a module of its own because `torch._inductor` takes about 2 s to import: agent.py imports this
only when a compiled path is asked for, so that every command starts without it.
"""
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class BiasAfterMatmul(CustomGraphPass):
    """Inductor pass for CPU graphs: `addmm(bias, x, w)` -> `mm(x, w) + bias`, the same function.

    On a CPU, addmm copies the bias into its output and then accumulates the GEMM onto it: an
    extra pass over every `(N, out)` activation. As a separate add, the bias joins the fused
    kernel of the activation that follows. Inductor does this rewrite itself on GPUs only.
    """

    def __call__(self, graph):
        for addmm in graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default):
            scaled = len(addmm.args) > 3 or addmm.kwargs  # beta or alpha given: keep it.
            if scaled or addmm.meta["val"].device.type != "cpu":
                continue
            bias, x, w = addmm.args
            with graph.inserting_before(addmm):
                product = graph.call_function(torch.ops.aten.mm.default, (x, w))
                output = graph.call_function(torch.ops.aten.add.Tensor, (product, bias))
            product.meta["val"] = output.meta["val"] = addmm.meta["val"]
            addmm.replace_all_uses_with(output)
            graph.erase_node(addmm)

    def uuid(self):
        return get_hash_for_files((__file__,))
