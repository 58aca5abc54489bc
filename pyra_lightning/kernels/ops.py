"""The Triton kernels as torch custom operators, so that ``torch.compile`` keeps them in its graph.

Why. Inductor cannot trace into a Triton launch made from Python: before these operators
existed, a ``"triton"`` rule compiled ran the torch rule instead (the kernels only ran eager and
under CUDA-graph capture). As a custom operator with a fake (shape-only) implementation, each
kernel is one opaque node of the compiled graph: inductor fuses everything around it and calls
the kernel where the eager model would, and a CUDA graph of the compiled model captures its
launches (``engine="inductor-cudagraph"``).

Only ``torch.compile`` uses them. Eager calls launch directly (a dispatcher round trip per
layer would be host time for nothing), and exports (``torch.export``, ONNX, ``torch.jit``) take
the torch rule, since an exported graph must run where Triton and this package are not. Neither
operator has a backward: the rules take the torch path wherever autograd records the merge.

Schemas are inferred from the signatures, so this module avoids postponed annotations.
"""

import torch


def compile_traced() -> bool:
    """Whether ``torch.compile`` is tracing now, as opposed to running eager or exporting a graph:
    the one case in which the kernels are called through these operators."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    return torch.compiler.is_compiling()


@torch.library.custom_op("pyra_lightning::node_max", mutates_args=())
def node_max(metric: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.matching.triton_node_max``: (B, Na) best cosine score of every A token (fp32) and
    its B partner (int64), for ``metric`` (B, N, C')."""
    from pyra_lightning.kernels.matching import triton_node_max

    return triton_node_max(metric, num_prefix_tokens)


@node_max.register_fake
def _node_max_shapes(metric: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_tokens = metric.shape[:2]
    na = (num_tokens + 1) // 2
    return metric.new_empty(batch, na, dtype=torch.float32), metric.new_empty(batch, na, dtype=torch.int64)


@torch.library.custom_op("pyra_lightning::merge_wavg", mutates_args=())
def merge_wavg(
    x: torch.Tensor,
    size: torch.Tensor | None,
    perm: torch.Tensor,
    dst_out: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight_r: torch.Tensor | None,
    weight_d: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.merging.launch_merge``: merged tokens (B, N - merge_r, C) and sizes (B, N - merge_r, 1)
    in ``x.dtype``. ``merge_r`` is ``dst_out``'s width; the four PYRA tensors are all ``None`` for
    ToMe (no modulation) or all given (eqs. 4-7)."""
    from pyra_lightning.kernels.merging import ModulationWeights, launch_merge

    weights = None if weight_r is None else ModulationWeights(norm_weight, norm_bias, weight_r, weight_d, eps)
    return launch_merge(x, size, perm, dst_out, weights)


@merge_wavg.register_fake
def _merge_wavg_shapes(
    x: torch.Tensor, size: torch.Tensor | None, perm: torch.Tensor, dst_out: torch.Tensor, *pyra: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes only: the four PYRA tensors and epsilon (``pyra``) do not change them."""
    batch, num_tokens, channels = x.shape
    kept = num_tokens - dst_out.shape[1]
    return x.new_empty(batch, kept, channels), x.new_empty(batch, kept, 1)
