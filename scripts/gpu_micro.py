"""Pieces the GPU check's micro-benchmarks share (``gpu_kernels``, ``gpu_backward``): the GPU's
clock (``device_ms``) and one ViT-B-like PYRA merge's inputs and timed calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def device_ms(fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Median ms per call on the GPU's clock (``triton.testing.do_bench``: CUDA events, L2 flushed
    between calls). The ``*_ms`` figures beside it are host-clock times with the GPU synchronised
    around each call, so for one layer they include a launch and a synchronisation; these do not.
    A failure is recorded in place of the figure, so it cannot cost the part its other rows. CUDA
    tensors only: ``do_bench`` needs a GPU driver."""
    from triton.testing import do_bench

    out: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            out[name] = do_bench(fn, return_mode="median")
        except Exception as error:  # recorded, never fatal: the rows above are already measured
            out[name] = f"{type(error).__name__}: {error}"[:200]
    return out


def merge_inputs(device: Any, batch: int, num_tokens: int, channels: int, merge_r: int) -> dict[str, Any]:
    """One ViT-B-like PYRA merge's inputs at ``batch``: tokens, sizes, a plan, a modulation with
    random ``W_D`` (zeros would hide it), a bf16 attention branch and a LayerNorm for ``norm2``."""
    import torch

    from pyra_lightning.merge import bipartite_soft_matching
    from pyra_lightning.modulation import PyraModulation

    torch.manual_seed(0)
    x = torch.randn(batch, num_tokens, channels, device=device)
    size = torch.randint(1, 4, (batch, num_tokens, 1), device=device).float()
    merge, _ = bipartite_soft_matching(torch.randn(batch, num_tokens, 64, device=device), merge_r, 1)
    mod = PyraModulation(merge_r, channels).to(device)
    norm = torch.nn.LayerNorm(channels).to(device)
    with torch.no_grad():
        mod.weight_d.normal_(std=0.1)
        norm.weight.normal_(1.0, 0.1), norm.bias.normal_(std=0.1)
    branch = torch.randn(batch, num_tokens, channels, device=device, dtype=torch.bfloat16)
    return {"merge": merge, "x": x, "size": size, "mod": mod, "norm": norm, "branch": branch}


def norm_fns(t: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """A merging block's merge and ``norm2`` as the fused kernel writes them (bf16, as autocast's
    ``fc1`` reads them), against the merge kernel and then torch's LayerNorm and bf16 cast."""
    import torch

    from pyra_lightning.kernels.merge_norm import triton_merge_wavg_norm
    from pyra_lightning.kernels.merging import triton_merge_wavg

    merge, x, size, mod, norm, branch = (t[k] for k in ("merge", "x", "size", "mod", "norm", "branch"))

    def apart() -> Any:
        merged, merged_size = triton_merge_wavg(merge, branch, size, mod, residual=x)
        return merged, merged_size, norm(merged).to(torch.bfloat16)

    return {
        "triton, residual read, then layer_norm and cast": apart,
        "triton with norm2 fused": lambda: triton_merge_wavg_norm(
            merge, branch, size, mod, x, norm, norm_dtype=torch.bfloat16
        ),
    }


def batch1_fns(t: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """``norm_fns`` and the pieces that separate, at batch 1, the modulation kernel's time (one
    program walking the pairs twice) from the merge kernel's and from what the fusion replaces."""
    import torch

    from pyra_lightning.kernels.merge_norm import triton_merge_wavg_norm

    merge, x, size, mod, norm, branch = (t[k] for k in ("merge", "x", "size", "mod", "norm", "branch"))
    return {
        **norm_fns(t),
        "ToMe: norm2 fused, no modulation kernel": lambda: triton_merge_wavg_norm(
            merge, branch, size, None, x, norm, norm_dtype=torch.bfloat16
        ),
        "torch add, layer_norm and cast (what the fusion replaces)": lambda: norm(x + branch).to(
            torch.bfloat16
        ),
    }
