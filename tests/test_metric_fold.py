"""``patch_vit.fold_metric``: the merge metric (the keys' mean over heads, eq. 3) computed by each
merging block's qkv projection, and where ``compile_for_inference`` applies it."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import randomize_
from test_kernels import REPO, run_interpreted

import pyra_lightning
from pyra_lightning import apply_lora, apply_merging, fold_lora
from pyra_lightning.families import find_family
from pyra_lightning.kernels import triton_available
from pyra_lightning.patch_common import merge_metric
from pyra_lightning.patch_vit import fold_metric, qkv_width

KW = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def _model(**extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**KW, **extra})
    model = apply_merging(apply_lora(model, 4), [6, 0, 4, 3], pyra=True)
    randomize_(model)  # LoRA's B and PYRA's W_D start at 0: give every weight a value
    return fold_lora(model).eval()


def test_the_folded_projection_computes_the_keys_mean_and_the_model_its_logits() -> None:
    """The three merging blocks (not the one with merge_r 0) get ``head_dim`` more qkv outputs:
    the metric each returns is the keys' mean over heads within fp32 rounding, and the logits are
    the unfolded model's; shapes and FLOPs accounting still read q/k/v's width."""
    model = _model()
    folded = copy.deepcopy(model)
    assert fold_metric(folded) == 3
    assert [block.attn.qkv.out_features for block in folded.blocks] == [160, 144, 160, 160]
    assert [block.attn.metric_channels for block in folded.blocks] == [16, 0, 16, 16]
    assert all(qkv_width(block.attn) == 48 for block in folded.blocks)
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.randn(2, 65, 48)
    with torch.no_grad():
        keys = model.blocks[0].attn(tokens)[1]  # (B, H, N, hd)
        metric = folded.blocks[0].attn(tokens)[1]  # (B, N, hd)
        assert keys.shape == (2, 3, 65, 16) and metric.shape == (2, 65, 16)
        torch.testing.assert_close(metric, keys.mean(dim=1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert pyra_lightning.count_flops(folded) >= pyra_lightning.count_flops(model)
    assert fold_metric(folded) == 0, "folding twice changes nothing"


def test_blocks_whose_keys_are_not_one_linear_map_keep_the_mean() -> None:
    """A LoRA layer not folded yet, or a k-norm (the keys' mean is no longer linear in x), leaves
    the block as it was."""
    torch.manual_seed(0)
    unfolded = apply_merging(apply_lora(timm.create_model("vit_tiny_patch16_224", **KW), 4), [6, 0, 4, 3])
    assert fold_metric(unfolded) == 0
    assert fold_metric(_model(qk_norm=True)) == 0


def test_compile_for_inference_folds_a_copy_only_for_the_triton_matcher() -> None:
    """The deployed copy of a Triton-rule model has the metric folded; the caller's model, and any
    model on the torch rule, do not (their results stay bitwise the eager model's)."""
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    plain = pyra_lightning.compile_for_inference(model, x, engine="eager")
    assert all(block.attn.metric_channels == 0 for block in plain.model.blocks)
    pyra_lightning.set_merge_rule(model, matcher="triton", merger="triton")
    served = pyra_lightning.compile_for_inference(model, x, engine="eager")
    assert [block.attn.metric_channels for block in served.model.blocks] == [16, 0, 16, 16]
    assert all(block.attn.metric_channels == 0 for block in model.blocks), "the caller's model is unchanged"
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), rtol=1e-5, atol=1e-5)


_INTERPRETED = """
import copy, timm, torch
from helpers import randomize_
from pyra_lightning import apply_merging
from pyra_lightning.patch_vit import fold_metric
torch.manual_seed(0)
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = timm.create_model("vit_tiny_patch16_224", **kw)
apply_merging(model, [6, 0, 4, 3], pyra=True, matcher="triton", merger="triton", attention="triton")
randomize_(model)
model.eval()
folded = copy.deepcopy(model)
assert fold_metric(folded) == 3
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
print("kernels read the folded metric")
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_triton_matcher_reads_the_folded_metric_as_a_strided_view_under_the_interpreter() -> None:
    """The folded metric is a view of qkv's output with its row stride; the matching kernel reads
    it in place, with the logits of the unfolded model."""
    assert "kernels read the folded metric" in run_interpreted(
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n" + _INTERPRETED
    )


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_a_deployed_triton_model_launches_no_mean_over_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """ViT-B/16 at 'high' with every Triton kernel and the metric folded, counted as a CUDA forward
    dispatches it (``tools/count_ops.py``): no ``mean`` is left, the metric is a ``split`` view
    of qkv's output, and the total stays 345 (a view replaced a kernel)."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from count_ops import count

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    rule = {"matcher": "triton", "merger": "triton", "attention": "triton"}
    apply_merging(model, "high", pyra=True, **rule)
    assert fold_metric(model) == 12
    ops = count(model)
    assert "mean" not in ops and ops["split_with_sizes"] == 24 and sum(ops.values()) == 345, ops


def _family_model(backbone: str, **extra: object) -> torch.nn.Module:
    """A tiny ``backbone`` with LoRA folded and every projection bias drawn at random: timm starts
    them at 0 (EVA's ``k_bias`` is a zero buffer), which would hide a fold that drops one."""
    from test_families import tiny

    model = apply_merging(apply_lora(tiny(backbone, **extra), 4), [6, 0, 4, 3], pyra=True)
    randomize_(model)
    model = fold_lora(model).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            biases = [getattr(module, name, None) for name in ("q_bias", "k_bias", "v_bias")]
            biases += [module.bias] if isinstance(module, torch.nn.Linear) else []
            for bias in filter(lambda b: b is not None, biases):
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.5)
    return model


def _block_metric(attn: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The metric one attention hands its block (``merge_metric`` of what it returns)."""
    forward = getattr(attn, "forward_metric", None)  # Eva: (x, rope, size); keys before rotation
    keys = forward(tokens, None, None)[1] if forward is not None else attn(tokens)[1]
    return merge_metric(keys)


@pytest.mark.parametrize(
    "backbone", ["vit", "dinov2_reg", "siglip", "eva02", "eva02_fused", "dinov3", "pe_core"]
)
def test_every_family_folds_the_metric_into_its_key_projection(backbone: str) -> None:
    """Each family's ``fold_metric`` (ViT: ``qkv``; Eva: the fused ``qkv`` or ``k_proj``, the mean
    over the key/value heads under grouped-query attention) folds the three merging blocks: the
    metric each hands its block is the keys' mean within fp32 rounding, the logits are the
    unfolded model's, and a second fold changes nothing."""
    model = _family_model(backbone)
    folded = copy.deepcopy(model)
    fold = find_family(folded).fold_metric
    rng = torch.get_rng_state()
    assert fold(folded) == 3
    assert torch.equal(torch.get_rng_state(), rng), "folding draws nothing from the caller's generator"
    width = model.blocks[0].attn.head_dim
    assert [block.attn.metric_channels for block in folded.blocks] == [width, 0, width, width]
    tokens = torch.randn(2, 65, model.embed_dim)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _block_metric(model.blocks[0].attn, tokens)  # (B, N, hd)
        got = _block_metric(folded.blocks[0].attn, tokens)
        assert got.shape == want.shape == (2, 65, width)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert fold(folded) == 0, "folding twice changes nothing"


@pytest.mark.parametrize("separate", [False, True])
def test_eva02s_bias_kept_apart_moves_into_the_folded_projection(separate: bool) -> None:
    """EVA-02's fused ``qkv`` has no bias of its own (timm adds ``cat(q_bias, k_bias, v_bias)``,
    inside the product or after it with ``qkv_bias_separate``): the folded copy holds that bias
    and the metric's, and drops the three, with the unfolded model's logits."""
    model = _family_model("eva02_fused")
    for block in model.blocks:
        block.attn.qkv_bias_separate = separate
    folded = copy.deepcopy(model)
    assert find_family(folded).fold_metric(folded) == 3
    attn = folded.blocks[0].attn
    assert attn.q_bias is None and attn.k_bias is None and attn.v_bias is None
    original = model.blocks[0].attn
    bias = torch.cat((original.q_bias, original.k_bias, original.v_bias)).detach()
    torch.testing.assert_close(attn.qkv.bias[: bias.numel()], bias, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_eva_blocks_with_a_k_norm_or_an_unfolded_peft_layer_keep_the_mean() -> None:
    """The Eva fold refuses what the ViT fold refuses: keys after a k-norm are not linear in x,
    and a LoRA layer not folded yet is not a plain ``nn.Linear``."""
    from test_families import tiny

    assert find_family(model := _family_model("eva02", qk_norm=True)).fold_metric(model) == 0
    unfolded = apply_merging(apply_lora(tiny("pe_core"), 4), [6, 0, 4, 3])
    assert find_family(unfolded).fold_metric(unfolded) == 0


@pytest.mark.parametrize(
    ("name", "kwargs", "bias_cat"),
    [
        ("eva02_base_patch14_224", {"qkv_fused": True}, True),  # q_bias/k_bias/v_bias kept apart
        ("vit_pe_core_base_patch16_224", {}, False),  # k_proj, attention pooling
    ],
)
def test_a_deployed_eva_model_launches_no_mean_over_its_keys(
    name: str, kwargs: dict[str, bool], bias_cat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EVA-02 B/14 and PE-Core B/16 at 'high' with the Triton rule, counted on the meta device as a
    forward dispatches them (``tools/count_ops.py``): folding removes one ``mean`` per merging
    block and, where timm keeps the fused ``qkv``'s bias apart, that block's bias ``cat``; a
    ``split`` view comes instead. (PE's attention pooling runs on the meta device too: its mask's
    dtype no longer asks autocast about a device type autocast lacks.)"""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from count_ops import count, launching

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    apply_merging(model, "high", pyra=True, matcher="triton", merger="triton", attention="triton")
    merging = sum(block.merge_r > 0 for block in model.blocks)
    before = count(model)
    assert find_family(model).fold_metric(model) == merging > 0
    after = count(model)
    assert before["mean"] - after["mean"] == merging, (before["mean"], after["mean"])
    assert before["cat"] - after["cat"] == (merging if bias_cat else 0), (before["cat"], after["cat"])
    assert after["split_with_sizes"] - before["split_with_sizes"] == merging
    assert launching(before) - launching(after) == merging * (2 if bias_cat else 1)


_INTERPRETED_EVA = """
import copy, torch
from helpers import randomize_
from test_families import tiny
from pyra_lightning import apply_merging, compile_for_inference
for backbone in ("pe_core", "eva02_fused"):
    model = apply_merging(tiny(backbone), [6, 0, 4, 3], pyra=True, matcher="triton", merger="triton")
    randomize_(model).eval()
    x = torch.randn(2, 3, 32, 32)
    served = compile_for_inference(model, x, engine="eager")
    assert [b.attn.metric_channels for b in served.model.blocks] == [16, 0, 16, 16], backbone
    assert all(b.attn.metric_channels == 0 for b in model.blocks), "the caller's model is unchanged"
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), rtol=1e-5, atol=1e-5)
print("eva kernels read the folded metric")
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_compile_for_inference_folds_eva_models_for_the_triton_matcher_under_the_interpreter() -> None:
    """PE (``k_proj`` under grouped-query attention) and EVA-02 (fused ``qkv``): the deployed copy
    of a Triton-rule model has the metric folded, the matching kernel reads it as a strided view of
    the projection's output, and the logits are the caller's model's."""
    assert "eva kernels read the folded metric" in run_interpreted(
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n" + _INTERPRETED_EVA
    )


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
@pytest.mark.parametrize(("pyra", "most", "launches"), [(False, 333, 47), (True, 345, 59)])
def test_the_triton_rules_dispatch_fewer_operators_per_forward(
    pyra: bool, most: int, launches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ViT-B/16 at 'high' with the ``triton`` matcher, merger and attention, counted as a CUDA
    forward would dispatch (meta device, launches recorded, not run: ``tools/count_ops.py``): 333
    ToMe / 345 PYRA operators including the kernel launches, from 476 / 596 with the torch rules;
    the plan kernel leaves no sort, gather or cat of indices to torch, the attention kernel
    takes ``log(size)`` itself, so SDPA runs only in the first block (no sizes yet), and the
    merge kernels add the residual, so only the MLP's residual adds remain (and the class token's),
    and write norm2 of what they merged (an ``empty`` for its output in place of a ``layer_norm``)."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from count_ops import count

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    apply_merging(model, "high", pyra=pyra, matcher="triton", merger="triton", attention="triton")
    ops = count(model)
    assert (
        ops["triton_launch"] == launches
    )  # per merging layer: scores, plan, [PYRA's,] the merge; 11 attentions
    assert sum(ops.values()) <= most
    assert "index_put_" not in ops and "baddbmm" not in ops  # the torch merge and matcher did not run
    assert "sort" not in ops and "gather" not in ops and ops["cat"] == 1  # only the class token's cat
    assert "log" not in ops and ops["scaled_dot_product_attention"] == 1
    assert ops["add"] == 13  # 12 MLP residuals and the position embedding: no attention residual
    assert ops["layer_norm"] == 13  # 12 norm1 and the final norm: each norm2 is its merge kernel's
