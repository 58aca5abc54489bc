"""The kernels part's micro-benchmark of the merge's backward (``scripts/gpu_kernels.py``).

Kept apart so the kernels part's module stays readable; run through ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

from typing import Any


def merge_backward_micro(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of one merging layer's backward in a training step (batch 128, high's first layer: 197
    tokens, 40 pairs, C 768; the fp32 residual stream and a bf16 attention branch, as under
    autocast) on the GPU's clock: the torch formula (about 34 kernels) against the Triton kernels
    (``kernels.merge_grad``: 3 launches), with their largest difference relative to the largest
    gradient."""
    from unittest import mock

    import torch
    from gpu_kernels import _merge_inputs, device_ms  # at call time: gpu_kernels imports this module

    from pyra_lightning.kernels import merge_grad
    from pyra_lightning.kernels.merging import triton_merge_wavg

    b, n, c, merge_r = (2, 37, 24, 8) if dry_run else (128, 197, 768, 40)
    t = _merge_inputs(device, b, n, c, merge_r)
    merge, size, mod = t["merge"], t["size"], t["mod"]
    stream, branch = t["x"].requires_grad_(), t["branch"].requires_grad_()
    result: dict[str, Any] = {"shape": [b, n, c], "merge_r": merge_r}
    out, _ = triton_merge_wavg(merge, branch, size, mod, residual=stream)
    upstream = torch.randn_like(out)
    with torch.no_grad():  # as backward() runs it
        runs = merge_grad.applies(upstream, merge_r, True)
    if not runs or out.grad_fn is None:
        return {**result, "triton": "not run: needs CUDA tensors and Triton"}
    inputs = [branch, stream, *mod.parameters()]

    def kernels() -> Any:
        return torch.autograd.grad(out, inputs, upstream, retain_graph=True)

    def formula() -> Any:
        with mock.patch.object(merge_grad, "applies", lambda *args: False):
            return kernels()

    got, want = kernels(), formula()
    result["max_rel_diff"] = max(
        ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
        for g, w in zip(got, want, strict=True)
    )
    if upstream.is_cuda:  # do_bench needs a GPU driver, which the interpreter has not
        result["device_ms"] = device_ms({"torch": formula, "triton": kernels})
    return result
