"""The Triton merger on timm's Eva family: shared rotary embeddings merged by the merge kernel
(``TritonWeightedAverage.weighted_mean``), against torch's sum and division."""

from __future__ import annotations

import pytest
import timm
import torch
from test_kernels import REPO, run_interpreted

from pyra_lightning import apply_merging
from pyra_lightning.kernels import triton_available

_ROPE_CHECK = """
import copy, torch
from helpers import randomize_
from test_families import tiny
from pyra_lightning import apply_merging, set_merge_rule
from pyra_lightning.merge_rules import TritonWeightedAverage
calls = []
weighted_mean = TritonWeightedAverage.weighted_mean
def counted(self, merge, rows, size):
    merged = weighted_mean(self, merge, rows, size)
    calls.append(merged is not None)
    return merged
TritonWeightedAverage.weighted_mean = counted
for backbone in ("eva02", "dinov3", "pe_core"):  # rope "cat" (N, R); "dinov3" (1, H, N, R); PE: GQA
    torch.manual_seed(0)
    model = randomize_(apply_merging(tiny(backbone), [6, 0, 4, 3], pyra=True)).eval()
    kernels = set_merge_rule(copy.deepcopy(model), merger="triton")  # the same (torch) matcher
    x = torch.randn(2, 3, 32, 32)
    calls.clear()
    with torch.no_grad():
        want, got = model(x), kernels(x)
    assert calls == [True, True, True], (backbone, calls)  # every merging block, on the kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
# the mean alone: sizes or none, and rows expanded over the batch as _rope_rows leaves them
from pyra_lightning.merge import bipartite_soft_matching
merge, _ = bipartite_soft_matching(torch.randn(3, 37, 8), 9, 1)
for rows in (torch.randn(3, 37, 20), torch.randn(1, 37, 20).expand(3, -1, -1)):
    for size in (None, torch.randint(1, 5, (3, 37, 1)).float()):
        weight = torch.ones_like(rows[..., :1]) if size is None else size
        want = merge(rows * weight, mode="sum") / merge(weight, mode="sum")
        got = TritonWeightedAverage().weighted_mean(merge, rows, size)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
print("rope merged by the kernel")
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_triton_merger_merges_shared_rotary_embeddings_under_the_interpreter() -> None:
    """EVA-02 (one embedding for every head), DINOv3 (per head) and PE: with the Triton merger, every
    merging block's rotary embeddings are merged by the kernel, and the logits are those of the
    torch merger (same matcher, so the same plan) within fp32 rounding."""
    assert "rope merged by the kernel" in run_interpreted(
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n" + _ROPE_CHECK
    )


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_rope_merge_is_one_launch_per_merging_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """EVA-02 B/14 at 'high' with the Triton rule, counted on the meta device as a CUDA forward
    dispatches it (``tools/count_ops.py``): torch merged each block's rotary embeddings with a
    product, a gather, a sum and a division (its two casts are to the dtype the rows have, and
    launch nothing), and a ``ones_like`` for the first block's sizes; the merge kernel does it in
    one launch, so no ``index_put_`` is left."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from count_ops import count, launching

    from pyra_lightning.merge_rules import TritonWeightedAverage

    with torch.device("meta"):
        model = timm.create_model("eva02_base_patch14_224", pretrained=False, qkv_fused=True)
    apply_merging(model, "high", pyra=True, matcher="triton", merger="triton", attention="triton")
    merging = sum(block.merge_r > 0 for block in model.blocks)
    after = count(model)
    monkeypatch.setattr(TritonWeightedAverage, "weighted_mean", lambda self, merge, rows, size: None)
    before = count(model)  # the torch path the block falls back to
    assert before["index_put_"] == merging and after["index_put_"] == 0, (before, after)
    assert after["triton_launch"] - before["triton_launch"] == merging
    assert launching(before) - launching(after) == 3 * merging + 1
    assert before["to_alias"] - after["to_alias"] == 2 * merging  # the casts it no longer needs
