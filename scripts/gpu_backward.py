"""The kernels part's micro-benchmarks of a training step's pieces (``scripts/gpu_kernels.py``): the
merge's backward, and proportional attention's forward and backward.

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
    from gpu_micro import device_ms, merge_inputs

    from pyra_lightning.kernels import merge_grad
    from pyra_lightning.kernels.merging import triton_merge_wavg

    b, n, c, merge_r = (2, 37, 24, 8) if dry_run else (128, 197, 768, 40)
    t = merge_inputs(device, b, n, c, merge_r)
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


def attention_training_micro(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of one proportional attention's forward and backward in a training step (batch 128, PYRA
    high's second layer: 12 heads, 157 tokens, 64 channels, bf16, q/k/v strided as timm's qkv
    leaves them) on the GPU's clock: SDPA with the ``log(size)`` mask (what training runs by
    default), SDPA on the key channel (``attention="sdpa_channel"``), and SDPA with no bias at
    all (the floor); the channel's gradient against the mask's, and whether flash attention takes
    the channel's call (forced with ``sdpa_kernel``: an error says why not). Then each of the two
    on each SDPA backend forced in turn (flash, memory-efficient, cuDNN), forward alone (as
    inference runs it) and forward and backward: which backend SDPA picks by itself is not
    necessarily the fastest, and flash rounds a 72-channel head up to its 96-channel kernel."""
    import torch
    import torch.nn.functional as F
    from gpu_micro import device_ms

    from pyra_lightning.kernels.attention import channel_proportional_attention, sdpa_proportional_attention

    b, h, n, d = (2, 3, 37, 16) if dry_run else (128, 12, 157, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
    size = torch.randint(1, 8, (b, n, 1), device=device).float()
    upstream = torch.randn(b, h, n, d, device=device, dtype=dtype)
    forwards = {
        "sdpa masked": lambda: sdpa_proportional_attention(q, k, v, size),
        "sdpa channel": lambda: channel_proportional_attention(q, k, v, size),
        "sdpa unmasked": lambda: F.scaled_dot_product_attention(q, k, v),
    }

    def step(forward: Any) -> Any:
        return lambda: torch.autograd.grad(forward(), qkv, upstream)[0]

    result: dict[str, Any] = {"shape": [b, h, n, d], "dtype": str(dtype)}
    want = step(forwards["sdpa masked"])().float()
    got = step(forwards["sdpa channel"])().float()
    result["grad_max_rel_diff"] = ((got - want).abs().max() / want.abs().max()).item()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                step(forwards["sdpa channel"])()
            result["channel_on_flash"] = True
        except RuntimeError as error:  # recorded: the timings below still run on SDPA's own choice
            result["channel_on_flash"] = f"{type(error).__name__}: {error}"[:200]
        timed = {f"{name} fwd+bwd": step(forward) for name, forward in forwards.items()}
        result["device_ms"] = device_ms(timed)

        def forced(fn: Any, backend: Any, grad: bool) -> Any:
            def run() -> Any:
                with sdpa_kernel([backend]), torch.set_grad_enabled(grad):
                    return fn()

            return run

        backends = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }
        per_backend = {}
        for label, backend in backends.items():
            for name in ("sdpa masked", "sdpa channel"):
                per_backend[f"{name} {label} fwd"] = forced(forwards[name], backend, grad=False)
                per_backend[f"{name} {label} fwd+bwd"] = forced(step(forwards[name]), backend, grad=True)
        result["device_ms_per_backend"] = device_ms(per_backend)  # a refusal is recorded as its error
    return result
