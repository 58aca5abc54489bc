"""LoRA, token merging and PYRA on real timm ViTs (tiny, random weights).

The checks every backbone passes (stock timm at merge_r=0, exact folding, prefix tokens, gradients,
bf16/compile, activation checkpointing) are in ``test_families.py``; these concern the ViT path.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import randomize_, tiny_vit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pyra_lightning import apply_lora, apply_merging, count_flops, fold_lora, mark_trainable
from pyra_lightning.lora import LoRALinear
from pyra_lightning.modulation import VARIANTS
from pyra_lightning.patch import PyraAttention, merge_schedule

TINY_BEIT = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_lora_keeps_timm_keys_and_only_lora_trains(tiny_model: nn.Module) -> None:
    model = apply_lora(tiny_model, lora_rank=4)
    keys = model.state_dict().keys()
    assert "blocks.0.attn.qkv.weight" in keys and "blocks.3.attn.qkv.bias" in keys
    assert "blocks.0.attn.qkv.lora_a" in keys and "blocks.0.attn.qkv.lora_b" in keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(4) for ab in "ab"}
    assert all(torch.count_nonzero(b.attn.qkv.lora_b) == 0 for b in model.blocks), "B starts at zero"


@pytest.mark.parametrize("lora_alpha", [None, 16.0])
@pytest.mark.parametrize("merge", [False, True])
def test_fold_is_exact_removes_lora_and_is_idempotent(lora_alpha, merge, x) -> None:
    model = apply_lora(tiny_vit(), lora_rank=4, lora_alpha=lora_alpha)
    if merge:
        apply_merging(model, [6, 5, 4, 3])
    randomize_(model).eval()
    with torch.no_grad():
        before = model(x)
        flops_before = count_flops(model)
        fold_lora(model)
        after = model(x)
        fold_lora(model)
        again = model(x)
    assert (before - after).abs().max().item() <= 1e-5
    assert torch.equal(after, again)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora" in k for k in model.state_dict())
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear
    plain = tiny_vit()
    if merge:
        apply_merging(plain, [6, 5, 4, 3])
    assert count_flops(model) == count_flops(plain) < flops_before


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pyra_variant_equals_tome_at_init_and_trains(variant: str, x) -> None:
    # Average pooling, so that the last block's merge also reaches the loss.
    tome = apply_merging(apply_lora(tiny_vit(global_pool="avg"), 4), [8, 6, 4, 2], pyra=False).eval()
    pyra = apply_merging(apply_lora(tiny_vit(global_pool="avg"), 4), [8, 6, 4, 2], pyra=variant).eval()
    pyra.load_state_dict(tome.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(pyra(x), tome(x), rtol=0, atol=1e-6)
    mark_trainable(pyra)
    pyra.train()
    pyra(x).logsumexp(-1).sum().backward()
    for block in pyra.blocks:
        grads = [p.grad for p in block.pyra.parameters()]
        assert grads and all(g is not None for g in grads), f"{variant}: PYRA receives no gradient"
        assert any(g.abs().sum() > 0 for g in grads), f"{variant}: PYRA gradient is zero"


def test_pyra_changes_the_output_once_trained(x) -> None:
    model = apply_merging(tiny_vit(), [8, 6, 4, 2]).eval()
    with torch.no_grad():
        before = model(x)
        model.blocks[0].pyra.weight_d.normal_(std=1.0)
        assert (model(x) - before).abs().max() > 1e-4


def test_layers_without_merging_hold_no_pyra() -> None:
    model = apply_merging(tiny_vit(), [4, 0, 3, 0])
    assert [b.pyra is None for b in model.blocks] == [False, True, False, True]
    assert model.blocks[0].pyra.weight_r.shape == (4, 1)
    assert model.blocks[2].pyra.weight_d.shape == (1, 48)
    assert not any(k.startswith("blocks.1.pyra") for k in model.state_dict())


def test_avg_pool_is_weighted_by_token_size(x) -> None:
    model = apply_merging(tiny_vit(class_token=False, global_pool="avg"), [16, 8, 4, 2]).eval()
    with torch.no_grad():
        tokens, state = model.forward_tokens(x)
        pooled = model.forward_head(tokens, pre_logits=True, size=state.size)
        expected = (tokens * state.size).sum(1) / state.size.sum(1)
        torch.testing.assert_close(pooled, model.fc_norm(expected))
        torch.testing.assert_close(model(x), model.head(pooled))


def _explicit_attention(attn: PyraAttention, h: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Textbook softmax(q kᵀ / sqrt(d) + log size) v, written independently of the patch."""
    B, N, C = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / (C // heads) ** 0.5
    if size is not None:
        logits = logits + size.log().view(B, 1, 1, N)
    out = torch.einsum("bhnm,bhmd->bhnd", logits.softmax(-1), v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_attention_paths_match_explicit_softmax(fused: bool, prop_attn: bool) -> None:
    model = apply_merging(apply_lora(tiny_vit(), 4), 4)
    randomize_(model).eval()
    attn = model.blocks[1].attn
    attn.fused_attn = fused
    h = torch.randn(2, 33, 48)
    size = torch.randint(1, 6, (2, 33, 1)).float() if prop_attn else None
    with torch.no_grad():
        out, keys = attn(h, size=size)
        expected = _explicit_attention(attn, h, size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert keys.shape == (2, 3, 33, 16)  # per head: the block averages them where it merges


def test_fused_and_unfused_models_agree_and_prop_attn_matters(x) -> None:
    model = randomize_(apply_merging(apply_lora(tiny_vit(), 4), [8, 6, 4, 2])).eval()
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)
        apply_merging(model, [8, 6, 4, 2], prop_attn=False)
        assert (model(x) - fused).abs().max() > 1e-6


def test_bf16_autocast_runs_and_stays_close(x) -> None:
    model = randomize_(apply_merging(apply_lora(tiny_vit(), 4), [8, 6, 4, 2])).eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_reapplying_merging_keeps_matching_pyra_layers() -> None:
    model = apply_merging(tiny_vit(), [8, 6, 4, 2])
    kept = model.blocks[0].pyra
    apply_merging(model, [8, 5, 4, 2])
    assert model.blocks[0].pyra is kept and model.blocks[1].pyra.merge_r == 5
    assert merge_schedule(model) == [8, 5, 4, 2]
    apply_merging(model, 0, pyra=False)
    assert all(b.pyra is None for b in model.blocks)


def test_schedule_forms(x) -> None:
    assert merge_schedule(apply_merging(tiny_vit(), 3)) == [3, 3, 3, 3]
    assert merge_schedule(apply_merging(tiny_vit(), (8, -1.0))) == [16, 10, 5, 0]
    assert merge_schedule(apply_merging(tiny_vit(), [1, 2, 3, 4])) == [1, 2, 3, 4]
    model = apply_merging(tiny_vit(), 0.6, pyra=False).eval()
    assert sum(merge_schedule(model)) > 0
    full = tiny_vit()
    for block in [*model.blocks, *full.blocks]:  # explicit attention: its matmuls are counted on CPU
        block.attn.fused_attn = False
    assert count_flops(model) <= 0.6 * count_flops(full) * 1.02


@pytest.mark.parametrize(
    ("merge_r", "message"),
    [
        (
            33,
            r"merge_r\[0\] = 33 is out of range: block 0 receives 65 tokens \(1 prefix\), so it can merge 0..32",
        ),
        ([-1, 0, 0, 0], r"merge_r\[0\] = -1 is out of range"),
        ([30, 30, 0, 0], r"merge_r\[1\] = 30 is out of range: block 1 receives 35 tokens"),
        ([1, 2, 3], r"schedule has 3 entries but the model has 4 blocks"),
        (
            "high",
            r"schedule 'high' means 0.289 of the FLOPs for this architecture \(depth=4, embed_dim=48, "
            r"prefix tokens=1, patches=64\): FLOPs target 0.289 is unreachable",
        ),
        ("medium", r"unknown schedule name 'medium'; expected one of \['high', 'low'\]"),
        (1.5, r"FLOPs target must lie strictly between 0 and 1"),
        (0.01, r"FLOPs target 0.010 is unreachable"),
    ],
)
def test_bad_schedules_are_clear_errors(merge_r, message) -> None:
    with pytest.raises(ValueError, match=message):
        apply_merging(tiny_vit(), merge_r)


@pytest.mark.parametrize("lora_rank", [0, -2])
def test_bad_lora_rank_is_a_clear_error(lora_rank: int) -> None:
    with pytest.raises(ValueError, match=f"lora_rank must be a positive integer, got {lora_rank}"):
        apply_lora(tiny_vit(), lora_rank)


def test_unknown_variant_and_unsupported_models_are_named() -> None:
    with pytest.raises(ValueError, match="pyra='fancy': expected True, False or a variant name"):
        apply_merging(tiny_vit(), 2, pyra="fancy")
    with pytest.raises(ValueError, match=r"ResNet \(resnet18\) is not a timm VisionTransformer"):
        apply_merging(timm.create_model("resnet18", pretrained=False), 2)
    pooled = tiny_vit(global_pool="map", class_token=False)
    pooled.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(64, 48))  # pos_embed='abs'
    with pytest.raises(ValueError, match=r"AttentionPoolLatent adds a position table"):
        apply_merging(pooled, 2)
    with pytest.raises(ValueError, match=r"Beit \(beit_base_patch16_224\) uses a relative position bias"):
        apply_lora(timm.create_model("beit_base_patch16_224", pretrained=False, **TINY_BEIT), 4)
    model = tiny_vit()
    model.blocks[1] = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"blocks\[1\] is Identity, expected timm's pre-norm Block"):
        apply_lora(model, 4)


def test_deit_distilled_averages_heads_in_eval(x) -> None:
    model = apply_merging(tiny_vit("deit_tiny_distilled_patch16_224"), [8, 6, 4, 2]).eval()
    assert isinstance(model, VisionTransformer)
    with torch.no_grad():
        tokens, _ = model.forward_tokens(x)
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)


def test_only_merging_blocks_average_the_keys_into_a_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention hands its keys per head to the block, which takes their mean over heads (the
    metric of eq. 3) only where it merges: a layer with ``merge_r`` 0 launches nothing for it."""
    import pyra_lightning.patch_vit as patch_vit

    model = apply_merging(tiny_vit(), [4, 0, 3, 0])
    calls: list[tuple[int, ...]] = []
    mean = patch_vit.merge_metric
    monkeypatch.setattr(patch_vit, "merge_metric", lambda keys: calls.append(tuple(keys.shape)) or mean(keys))
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
    assert len(calls) == 2 and all(len(shape) == 4 for shape in calls), calls  # (B, H, N, hd)
