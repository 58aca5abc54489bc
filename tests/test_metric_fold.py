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
from pyra_lightning.kernels import triton_available
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
