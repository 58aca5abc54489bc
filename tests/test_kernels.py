"""The Triton matcher under Triton's CPU interpreter, and FlexAttention's proportional attention."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pyra_lightning.kernels import triton_available
from pyra_lightning.kernels.attention import flex_proportional_attention

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(script: str) -> str:
    """Run ``script`` in a child process under Triton's CPU interpreter; its stdout.

    A child process, because TRITON_INTERPRET must be set before triton is first imported.
    """
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


_CHECK = """
import torch
from pyra_lightning.kernels.matching import triton_match
from pyra_lightning.merge import match, max_merge_r
torch.manual_seed(0)
cases = 0
for prefix in range(5):
    for tokens in (17, 38, 197):  # odd, even, ViT-B/16: none a multiple of 16
        for merge_r in sorted({1, max_merge_r(tokens, prefix)}):
            metric = torch.randn(3, tokens, 24)
            got, want = triton_match(metric, merge_r, prefix), match(metric, merge_r, prefix)
            for name, g, w in zip(("src", "dst", "unm"), got, want):
                assert torch.equal(g, w), (prefix, tokens, merge_r, name)
            cases += 1
print("cases", cases)
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_matcher_equals_the_torch_matcher_under_the_interpreter() -> None:
    """Odd token counts, 0-4 prefix tokens, merge_r 1 and at its maximum, fp32, random data."""
    assert "cases 30" in run_interpreted(_CHECK)


_MODEL_CHECK = """
import timm, torch
from pyra_lightning import apply_merging
from pyra_lightning.merge_rules import MATCHERS
assert "triton" in MATCHERS
torch.manual_seed(0)
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    outputs = {}
    for matcher in ("bipartite", "triton"):
        apply_merging(model, [12, 8, 6, 4], pyra=True, matcher=matcher)
        assert all(type(b.matcher).__name__ == ("TritonMatcher" if matcher == "triton" else "BipartiteMatcher")
                   for b in model.blocks)
        outputs[matcher] = model(x)
assert torch.equal(outputs["bipartite"], outputs["triton"]), (outputs["bipartite"] - outputs["triton"]).abs().max()
print("same output")
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_triton_matcher_is_a_registered_merge_rule_with_the_same_model_output() -> None:
    """Through the seam a user takes: ``apply_merging(..., matcher="triton")``, under the interpreter."""
    assert "same output" in run_interpreted(_MODEL_CHECK)


def test_triton_matcher_falls_back_to_torch_on_cpu_without_the_interpreter() -> None:
    from pyra_lightning.kernels import use_triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    assert not use_triton(torch.zeros(1))


@pytest.mark.parametrize("with_size", [True, False])
def test_flex_proportional_attention_equals_sdpa_with_the_log_size_mask(with_size: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    size = torch.randint(1, 6, (2, 37, 1)).float() if with_size else None
    mask = size.log().view(2, 1, 1, 37) if size is not None else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(flex_proportional_attention(q, k, v, size), expected, rtol=1e-5, atol=1e-5)
