"""The ``"sdpa_channel"`` proportional attention: ``log(size)`` carried as one more key channel, so
SDPA runs with no mask. The same function as the masked SDPA, forward and backward, on every
backbone family, in training steps and in exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import exported_round_trip, randomize_
from test_kernels import ATTENTION_MODELS

import pyra_lightning.kernels.attention as attention
from pyra_lightning.kernels.attention import ATTENTIONS, channel_proportional_attention
from pyra_lightning.patch import apply_merging, attention_kernel
from pyra_lightning.peft import apply_lora

# head widths with 8 spare channels (ViT-B/16's 64, 24, 16, 8) and with 1, 3, 4 and 7 (63, 61, 60, 57)
SHAPES = (
    (2, 3, 37, 64),
    (1, 2, 50, 60),
    (3, 2, 17, 24),
    (2, 1, 9, 8),
    (1, 4, 197, 16),
    (2, 2, 21, 63),
    (1, 3, 30, 61),
    (2, 1, 13, 57),
)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v strided as timm's qkv leaves them, and sizes 1..39 (the class token's 1)."""
    batch, heads, tokens, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    size = torch.randint(1, 40, (batch, tokens, 1), generator=generator).to(dtype)
    size[:, 0] = 1
    return q, k, v, size


@pytest.mark.parametrize("shape", SHAPES)
def test_the_key_channel_gives_the_masked_attention_and_its_gradients(shape: tuple[int, ...]) -> None:
    """fp64: the output and the gradients with respect to q, k and v equal those of SDPA with the
    ``log(size)`` mask to rounding, at widths with 1, 3, 4, 7 and 8 spare channels."""
    q, k, v, size = _inputs(shape, torch.float64)
    mask = size.log().view(shape[0], 1, 1, shape[2])
    grad_out = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        lambda q, k, v: channel_proportional_attention(q, k, v, size),
    ):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    for got, want in zip(results[1], results[0], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "size_dtype", "head_dim"),
    [
        (torch.float32, torch.float32, 64),
        (torch.bfloat16, torch.float32, 64),
        (torch.float16, torch.float32, 64),
        (torch.bfloat16, torch.bfloat16, 80),  # a model held in bf16; a head whose 1/s is inexact
        (torch.bfloat16, torch.float32, 57),
    ],
)
def test_the_key_channel_is_no_less_accurate_than_the_mask(
    dtype: torch.dtype, size_dtype: torch.dtype, head_dim: int
) -> None:
    """In fp32, bf16 and fp16, each against fp64: the channel's error is at most the masked call's
    (plus a rounding's worth): its bias is computed in fp32 and rounded once, as the mask's is."""
    shape = (2, 4, 197, head_dim)
    q, k, v, size = _inputs(shape, torch.float64, seed=5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=size.log().view(2, 1, 1, 197))
    low = [t.to(dtype) for t in (q, k, v)]
    sizes = size.to(size_dtype)  # small integers: exact in bf16
    masked = F.scaled_dot_product_attention(*low, attn_mask=sizes.float().log().to(dtype).view(2, 1, 1, 197))
    channel = channel_proportional_attention(*low, sizes)
    assert channel.dtype == dtype
    masked_error = (masked.double() - want).abs().max().item()
    channel_error = (channel.double() - want).abs().max().item()
    assert channel_error <= 1.5 * masked_error + (1e-6 if dtype == torch.float32 else 1e-3)


def test_a_size_of_zero_masks_its_key_as_the_mask_does() -> None:
    """``log(0) = -inf`` is the mask's way of leaving a key out; the channel adds it without a NaN
    (only the first spare key channel holds the bias, so no 0 * -inf is summed)."""
    q, k, v, size = _inputs((2, 3, 20, 60), torch.float64)
    size[:, 5] = 0
    got = channel_proportional_attention(q, k, v, size)
    assert not got.isnan().any()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=size.log().view(2, 1, 1, 20))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("head_dim", "width"), [(64, 72), (60, 64), (63, 64), (57, 64), (8, 16)])
def test_sdpa_gets_aligned_heads_the_model_scale_and_the_dropout(
    head_dim: int, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDPA gets no mask, heads widened to the next multiple of 8 above d (flash attention's
    rule), the model's scale (not that of the wider head) and the dropout probability; without
    sizes (the first block) the call is timm's own, dropout included. q and k in fp32 with v in
    bf16 (a q/k norm under autocast) keep v's dtype: v is not promoted to fp32."""
    q, k, v, size = _inputs((2, 3, 20, head_dim), torch.float32)
    v = v.to(torch.bfloat16)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append((q.shape, k.shape, v.shape, v.dtype, kwargs))
        return sdpa(q, k, v.to(q.dtype), **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    channel_proportional_attention(q, k, v, size, 0.25)
    channel_proportional_attention(q, k, v, None, 0.5)
    (q_shape, k_shape, v_shape, v_dtype, kwargs), plain = calls
    assert q_shape == k_shape == v_shape == (2, 3, 20, width) and v_dtype == torch.bfloat16
    assert kwargs == {"dropout_p": 0.25, "scale": head_dim**-0.5}  # no attn_mask
    shape = (2, 3, 20, head_dim)
    assert plain == (shape, shape, shape, torch.bfloat16, {"dropout_p": 0.5})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_spare_channels_hold_one_and_the_bias_rounded_once(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The widened heads SDPA gets: q's spare channels are [1, 0, ...], k's [log(size)/s, 0, ...]
    with the bias within half a unit in the last place of ``dtype`` of the exact value, up to
    fp32's own rounding (computed in fp32 and rounded once, even for sizes held in bf16, at a head
    width whose 1/s is inexact), and q and k themselves unchanged."""
    head_dim = 80
    q, k, v, size = _inputs((2, 3, 40, head_dim), dtype)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append((q, k))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    channel_proportional_attention(q, k, v, size)
    ((wide_q, wide_k),) = seen
    assert torch.equal(wide_q[..., :head_dim], q) and torch.equal(wide_k[..., :head_dim], k)
    assert (wide_q[..., head_dim] == 1).all() and (wide_q[..., head_dim + 1 :] == 0).all()
    assert (wide_k[..., head_dim + 1 :] == 0).all()
    exact = size.double().log().view(2, 1, 40) * head_dim**0.5  # (B, 1, N)
    # half a unit in the last place of dtype, plus a few of fp32's for the log and the product
    bound = torch.finfo(dtype).eps / 2 + 4 * torch.finfo(torch.float32).eps
    error = (wide_k[..., head_dim].double() - exact).abs()
    assert (error <= exact.abs() * bound).all(), error.max()


def test_no_sizes_is_the_plain_call() -> None:
    q, k, v, _ = _inputs((2, 3, 20, 64), torch.float32)
    torch.testing.assert_close(
        channel_proportional_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v)
    )


@pytest.mark.parametrize("family", sorted(ATTENTION_MODELS))
def test_a_training_step_on_the_key_channel_equals_the_masked_one(family: str) -> None:
    """LoRA + PYRA on each family, in training mode: the logits, the loss and every trainable
    parameter's gradient (LoRA, PYRA's W_D and W_r, the head) equal those of ``attention="sdpa"``,
    and each merged block attended through the channel (every call but the first had sizes)."""
    name, extra = ATTENTION_MODELS[family]
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    target = torch.tensor([1, 3])
    runs = {}
    for kernel in ("sdpa", "sdpa_channel"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **{**kw, **extra})
        torch.nn.init.normal_(model.get_classifier().weight, std=0.2)  # timm's is ~1e-5 for some
        apply_lora(model, 4)
        apply_merging(model, [12, 8, 6, 4], pyra=True, attention=kernel)
        randomize_(model)
        assert attention_kernel(model) == kernel
        calls: list[torch.Tensor | None] = []
        original = ATTENTIONS[kernel]
        ATTENTIONS[kernel] = lambda *args, original=original, calls=calls: (
            calls.append(args[3]) or original(*args)
        )
        try:
            logits = model.train()(x)
        finally:
            ATTENTIONS[kernel] = original
        assert len(calls) == 4 and calls[0] is None and all(s is not None and s.max() > 1 for s in calls[1:])
        loss = F.cross_entropy(logits, target)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        runs[kernel] = (logits.detach(), grads)
    assert runs["sdpa"][0].abs().max() > 0.01  # logits of a scale a wrong bias would show in
    torch.testing.assert_close(runs["sdpa_channel"][0], runs["sdpa"][0], rtol=1e-5, atol=1e-6)
    assert runs["sdpa_channel"][1].keys() == runs["sdpa"][1].keys()
    for key, grad in runs["sdpa"][1].items():
        torch.testing.assert_close(runs["sdpa_channel"][1][key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_the_setting_trains_exports_and_reloads(tmp_path: Path) -> None:
    """``model.merging.attention: sdpa_channel`` in a run's settings: the blocks attend with it, the
    export records it, the reloaded model gives the same logits, and ONNX takes it (its graph is
    xlogy, concat and an unmasked attention)."""
    from pyra_lightning.deploy import to_onnx

    module, served, x = exported_round_trip(tmp_path / "model", "sdpa_channel")
    with torch.no_grad():
        want = module.model(x)
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install '.[onnx]') is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra (pip install '.[onnx]') is not installed")
    import onnxruntime

    path = to_onnx(served.model, tmp_path / "m.onnx", x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
