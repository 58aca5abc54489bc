"""One suite over a table of backbones: every family the patch supports passes the same checks.

Each row is a tiny random-weight model of a real timm architecture, so the same code paths run as
for the pretrained ones (class/distillation/register tokens, layer scale, rotary embeddings,
SwiGLU, grouped-query attention, attention pooling). Checks that only concern one family stay in
``test_patch.py`` (ViT) and ``test_eva.py`` (Eva).
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import randomize_
from torch import nn

from pyra_lightning import apply_lora, apply_merging, count_flops, count_parameters, fold_lora, mark_trainable
from pyra_lightning.accounting import flop_counter_mode
from pyra_lightning.families import FAMILIES, find_family, model_shape
from pyra_lightning.lora import LoRALinear
from pyra_lightning.merge import MergeFn, UnmergeFn
from pyra_lightning.merge_rules import Matcher
from pyra_lightning.schedules import block_flops, schedule_flops, token_counts

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
SCHEDULE = [8, 6, 4, 2]
# backbone -> (timm architecture, overrides of TINY, prefix tokens)
BACKBONES: dict[str, tuple[str, dict, int]] = {
    "vit": ("vit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),  # class + distillation token, two heads
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}, 5),  # 4 registers, layer scale
    "eva02": ("eva02_base_patch14_224", {}, 1),  # separate q/k/v, SwiGLU with scale norm, rope "cat"
    "eva02_fused": ("eva02_base_patch14_224", {"qkv_fused": True}, 1),  # fused qkv + q_bias/v_bias
    "dinov3": ("vit_base_patch16_dinov3_qkvb", {}, 5),  # rope "dinov3", 4 storage tokens, layer scale
    "pe_core": (  # AttentionRope, grouped-query attention, attention pooling, pre-norm
        "vit_pe_core_base_patch16_224",
        {"embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "qkv_fused": False},
        1,
    ),
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", {}, 1),  # per-layer learned frequencies
    "siglip": ("vit_base_patch16_siglip_224", {}, 0),  # VisionTransformer with attention pooling
}
# Prefix-token layouts of the ViT beyond the table's, for the prefix check only.
PREFIX_LAYOUTS: dict[str, tuple[str, dict, int]] = {
    "vit_reg4": ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
    "vit_no_class": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
}


def tiny(backbone: str, seed: int = 0, **kwargs) -> nn.Module:
    name, overrides, _ = {**BACKBONES, **PREFIX_LAYOUTS}[backbone]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **overrides, **kwargs})
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        nn.init.normal_(head.weight, std=0.2)
    return model


def pooled_over_tokens(backbone: str) -> dict:
    """Average pooling, so that the last block's merge reaches the loss; distilled DeiT's two heads
    read the class and distillation tokens only (timm refuses another pool)."""
    return {} if backbone == "deit_distilled" else {"global_pool": "avg"}


def set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_merge_r_zero_is_stock_timm(backbone: str, fused: bool, x: torch.Tensor) -> None:
    stock = tiny(backbone).eval()
    # Frozen as apply_lora freezes the backbone: torch 2.11's CPU matmul folds a broadcast input
    # (AttentionPoolLatent's latent.expand(B, -1, -1)) by whether the weight requires grad, even
    # under no_grad, and the two orders of summation differ by 1e-8 (measured; 2.14 gives the same bits).
    stock.requires_grad_(False)
    patched = apply_merging(apply_lora(tiny(backbone), 4), 0, pyra=True).eval()
    set_fused(stock, fused)
    set_fused(patched, fused)
    with torch.no_grad():
        expected = stock(x)
        torch.testing.assert_close(patched(x), expected, rtol=0, atol=0)
        # Proportional attention with all sizes 1 adds log(1) = 0: still exact.
        tokens, _ = patched.forward_tokens(x)
        ones = torch.ones(tokens.shape[0], tokens.shape[1], 1)
        torch.testing.assert_close(patched.forward_head(tokens, size=ones), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pyra_equals_tome_at_init_and_fused_equals_explicit(backbone: str, x: torch.Tensor) -> None:
    tome = randomize_(apply_merging(apply_lora(tiny(backbone), 4), SCHEDULE, pyra=False)).eval()
    pyra = apply_merging(apply_lora(tiny(backbone), 4), SCHEDULE, pyra=True).eval()
    pyra.load_state_dict(tome.state_dict(), strict=False)
    with torch.no_grad():
        expected = tome(x)
        torch.testing.assert_close(pyra(x), expected, rtol=0, atol=1e-6)
        set_fused(pyra, False)
        torch.testing.assert_close(pyra(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fold_is_exact_idempotent_and_loads_into_stock_timm(backbone: str, x: torch.Tensor) -> None:
    model = randomize_(apply_merging(apply_lora(tiny(backbone), 4, lora_alpha=8.0), SCHEDULE)).eval()
    with torch.no_grad():
        before = model(x)
        fold_lora(model)
        after = model(x)
        fold_lora(model)
        again = model(x)
    assert (before - after).abs().max().item() <= 1e-5
    assert torch.equal(after, again)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora" in k for k in model.state_dict())
    # Without merging, the folded weights are a stock timm model's.
    unmerged = randomize_(apply_lora(tiny(backbone), 4)).eval()
    with torch.no_grad():
        expected = unmerged(x)
    stock = tiny(backbone, seed=3).eval()
    stock.load_state_dict(fold_lora(unmerged).state_dict(), strict=True)
    with torch.no_grad():
        assert (stock(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backbone", [*BACKBONES, *PREFIX_LAYOUTS])
def test_prefix_tokens_never_merge_and_sizes_sum_to_patches(backbone: str, x: torch.Tensor) -> None:
    model = tiny(backbone)
    num_prefix = {**BACKBONES, **PREFIX_LAYOUTS}[backbone][2]
    assert model.num_prefix_tokens == num_prefix
    total = 64 + num_prefix
    schedule = [32, 8, 4, 2]  # the first block merges every mergeable pair it can
    apply_merging(model, schedule, trace_source=True).eval()
    with torch.no_grad():
        tokens, state = model.forward_tokens(x)
    assert tokens.shape[1] == total - sum(schedule)
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), float(total)))
    for i in range(num_prefix):
        assert state.source[:, i, i].eq(1).all() and state.source[:, i].sum(-1).eq(1).all()
        assert state.size[:, i].eq(1).all()
    assert torch.equal(state.source.sum(-1, keepdim=True), state.size)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_reach_only_lora_pyra_and_head(backbone: str, x: torch.Tensor) -> None:
    model = apply_merging(
        apply_lora(tiny(backbone, **pooled_over_tokens(backbone)), 4, lora_dropout=0.1), SCHEDULE
    )
    groups = mark_trainable(model)
    assert groups["head"] and groups["head"] == [
        n for n, _ in model.named_parameters() if n.startswith("head")
    ]
    model.train()
    model(x).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(groups["lora"]) | set(groups["pyra"]) | set(groups["head"])
    assert all(".lora_" in n or ".pyra." in n or n.startswith("head") for n in with_grad)
    # W_D starts at zero, so only it moves at first (eq. 7). A head that reads prefix tokens only
    # (distilled DeiT) never sees the last block's merge.
    for block in model.blocks if pooled_over_tokens(backbone) else model.blocks[:-1]:
        assert any(p.grad.abs().sum() > 0 for p in block.pyra.parameters())
    counts = count_parameters(model)
    assert counts.trainable == counts.lora + counts.pyra + counts.head and counts.other_trainable == 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bf16_autocast_and_torch_compile_run(backbone: str, x: torch.Tensor) -> None:
    model = randomize_(apply_merging(apply_lora(tiny(backbone), 4), 0)).eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
        # Merged, bf16 rounding may flip near-tied matches of these random weights, so only dtype and
        # finiteness are asserted (test_patch.py checks a merged ViT's bf16 output is close).
        apply_merging(model, SCHEDULE)
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["vit", "dinov3", "rope_mixed"])
def test_activation_checkpointing_recomputes_blocks_and_matches_plain_backward(
    backbone: str, x: torch.Tensor
) -> None:
    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        model = randomize_(
            apply_merging(apply_lora(tiny(backbone, **pooled_over_tokens(backbone)), 4), SCHEDULE)
        )
        mark_trainable(model)
        model.set_grad_checkpointing(checkpointing)
        calls = [0]
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        model(x).square().sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad], calls[0]

    (plain, plain_calls), (checkpointed, checkpointed_calls) = grads(False), grads(True)
    depth = TINY["depth"]
    assert plain_calls == depth
    assert checkpointed_calls == 2 * depth, "every block must run again in the backward pass"
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_registered_family_has_a_row_in_the_table() -> None:
    """A family registered in ``families.py`` gets this suite only through a ``BACKBONES`` row."""
    with torch.device("meta"):
        covered = {
            find_family(timm.create_model(name, pretrained=False, **{**TINY, **overrides})).name
            for name, overrides, _ in BACKBONES.values()
        }
    assert covered == {family.name for family in FAMILIES.values()}


class RecordingMatcher:
    """A block's matcher that records the metric's shape of every call (the FLOPs its scores add)."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher, self.name = matcher, matcher.name
        self.metrics: list[tuple[int, ...]] = []

    def __call__(
        self, metric: torch.Tensor, merge_r: int, num_prefix_tokens: int
    ) -> tuple[MergeFn, UnmergeFn]:
        self.metrics.append(tuple(metric.shape))
        return self.matcher(metric, merge_r, num_prefix_tokens)


def merge_overhead(recorder: RecordingMatcher, merge_r: int, width: int, pyra: bool) -> int:
    """The matmul FLOPs of one block's merge, which the FLOPs model leaves out: bipartite scores
    (Na, C') @ (C', Nb) on the metric, and PYRA's generators ``M_info W_r``, ``W_D M_info`` (eq. 5)."""
    if merge_r == 0:
        assert not recorder.metrics, "a block that merges nothing calls no matcher"
        return 0
    ((batch, tokens, metric_width),) = recorder.metrics
    scores = 2 * batch * ((tokens + 1) // 2) * (tokens // 2) * metric_width
    return scores + (2 * 2 * batch * merge_r * width if pyra else 0)


@pytest.mark.parametrize(
    ("schedule", "pyra"),
    [([0, 0, 0, 0], False), (SCHEDULE, True), ([0, 8, 0, 4], False)],
    ids=["unmerged", "pyra", "tome_late"],
)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_flops_model_equals_the_flop_counter_per_block_and_in_total(
    backbone: str, schedule: list[int], pyra: bool
) -> None:
    """What the FLOPs solver adds up (``schedules.schedule_flops`` over the family's ``ViTShape``)
    is what ``torch.utils.flop_counter`` measures, exactly, block by block and in total.

    Exact, not within a tolerance: both count matmul-like operators only, 2 FLOPs per multiply-add
    (element-wise ones, norms, softmax, GELU, the merge's gathers and scatters, are in neither).
    The one difference is known and added here: the merge's own products, left out of the model
    (``merge_overhead``), which this test bounds at 1% of a block at this tiny size (0.04% for
    ViT-B/16 at 224 px, 0.12% for ViT-S/16). The rotary embeddings that per-layer RoPE rebuilds
    after a merge are counted outside the blocks, in the model's ``rope_token_flops``.
    """
    model = tiny(backbone).requires_grad_(False).eval()  # frozen, as in training
    shape = model_shape(model)
    apply_merging(model, schedule, pyra=pyra)
    recorders = [RecordingMatcher(block.matcher) for block in model.blocks]
    for block, recorder in zip(model.blocks, recorders, strict=True):
        block.matcher = recorder
    with torch.no_grad(), flop_counter_mode() as counter:
        model(torch.zeros(1, 3, 32, 32))
    measured = counter.get_flop_counts()
    counts = token_counts(schedule, shape)
    overheads = []
    for layer, (recorder, merge_r) in enumerate(zip(recorders, schedule, strict=True)):
        analytic = block_flops(counts[layer], counts[layer + 1], shape, layer)
        overheads.append(merge_overhead(recorder, merge_r, shape.embed_dim, pyra))
        block = sum(measured[f"{type(model).__name__}.blocks.{layer}"].values())
        assert block == analytic + overheads[-1], (layer, block, analytic, overheads[-1])
        assert overheads[-1] <= 0.01 * analytic
    total = counter.get_total_flops()
    assert total == schedule_flops(schedule, shape) + sum(overheads)
    assert count_flops(model) == total
