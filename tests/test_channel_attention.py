"""The ``"sdpa_channel"`` proportional attention: ``log(size)`` carried as one more key channel, so
SDPA runs with no mask. The same function as the masked SDPA, forward and backward, on every
backbone family, in training steps and in exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import randomize_, tiny_module
from test_kernels import ATTENTION_MODELS

import pyra_lightning.kernels.attention as attention
from pyra_lightning.kernels.attention import ATTENTIONS, channel_proportional_attention
from pyra_lightning.patch import apply_merging, attention_kernel
from pyra_lightning.peft import apply_lora

# head widths: ViT-B/16's 64, one that is no multiple of 8, one that is (spare channels 8), 8 itself
SHAPES = ((2, 3, 37, 64), (1, 2, 50, 60), (3, 2, 17, 24), (2, 1, 9, 8), (1, 4, 197, 16))


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
    ``log(size)`` mask to rounding, at widths with 1 to 8 spare channels."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_key_channel_is_no_less_accurate_than_the_mask(dtype: torch.dtype) -> None:
    """In fp32 and bf16, each against fp64: the channel's error is at most the masked call's (plus a
    rounding's worth), since at 64 channels its bias is the mask's, rounded the same way."""
    shape = (2, 4, 197, 64)
    q, k, v, size = _inputs(shape, torch.float64, seed=5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=size.log().view(2, 1, 1, 197))
    low = [t.to(dtype) for t in (q, k, v)]
    masked = F.scaled_dot_product_attention(*low, attn_mask=size.float().log().to(dtype).view(2, 1, 1, 197))
    channel = channel_proportional_attention(*low, size.float())
    assert channel.dtype == dtype
    masked_error = (masked.double() - want).abs().max().item()
    channel_error = (channel.double() - want).abs().max().item()
    assert channel_error <= 1.5 * masked_error + (1e-6 if dtype == torch.float32 else 1e-3)


def test_no_sizes_is_the_plain_call_and_dropout_reaches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without sizes (the first block) it is SDPA as timm calls it; with sizes SDPA gets no mask,
    the widened heads, the model's scale (not that of the wider head) and the dropout probability."""
    q, k, v, size = _inputs((2, 3, 20, 64), torch.float32)
    torch.testing.assert_close(
        channel_proportional_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v)
    )
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append((q.shape, k.shape, v.shape, kwargs))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    channel_proportional_attention(q, k, v, size, 0.25)
    ((q_shape, k_shape, v_shape, kwargs),) = calls
    assert q_shape == k_shape == v_shape == (2, 3, 20, 72)
    assert kwargs == {"dropout_p": 0.25, "scale": 64**-0.5}  # no attn_mask


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
    pad, concat and an unmasked attention)."""
    from pyra_lightning.commands.export import export_model, load_exported
    from pyra_lightning.deploy import to_onnx

    module = tiny_module(merging={"attention": "sdpa_channel"}).eval()
    assert attention_kernel(module.model) == "sdpa_channel"
    out = export_model(module, tmp_path / "model", mean=(0.5,) * 3, std=(0.5,) * 3)
    served = load_exported(out)
    assert served.config["attention"] == "sdpa_channel" and attention_kernel(served.model) == "sdpa_channel"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = module.model(x)
        torch.testing.assert_close(served.model(x), want)
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install '.[onnx]') is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra (pip install '.[onnx]') is not installed")
    import onnxruntime

    path = to_onnx(served.model, tmp_path / "m.onnx", x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
