"""The Triton merger reads the block's residual add (``residual + branch``) as it loads tokens, under
Triton's CPU interpreter: the result of ``merge_wavg`` on the sum, in the sum's dtype, and a
merging block that never writes the sum."""

from __future__ import annotations

import pytest
from test_kernels import run_interpreted

from pyra_lightning.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

_RESIDUAL_CHECK = """
import torch
from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg
from pyra_lightning.merge import bipartite_soft_matching, max_merge_r, merge_wavg
from pyra_lightning.modulation import PyraModulation
torch.manual_seed(0)

def modulation(merge_r, dim):
    mod = PyraModulation(merge_r, dim)
    with torch.no_grad():  # W_D starts at 0 (the identity): give every weight a value
        for param in mod.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return mod

cases = 0
# (residual, branch) dtypes: fp32; autocast's fp32 stream + bf16/fp16 branch; a model held in bf16
for res_dtype, branch_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                (torch.float32, torch.float16), (torch.float16, torch.float16),
                                (torch.bfloat16, torch.bfloat16)):
    for prefix, tokens in ((0, 38), (1, 197), (4, 21)):
        merge_r = max_merge_r(tokens, prefix)
        merge, _ = bipartite_soft_matching(torch.randn(2, tokens, 8), merge_r, prefix)
        for pyra in (False, True):
            residual = torch.randn(2, tokens, 40).to(res_dtype)
            branch = torch.randn(2, tokens, 40).to(branch_dtype)
            size = torch.randint(1, 5, (2, tokens, 1)).to(res_dtype) if pyra else None
            mod = modulation(merge_r, 40).to(torch.promote_types(res_dtype, branch_dtype)) if pyra else None
            with torch.no_grad():
                assert kernel_applies(merge, branch, size, mod, residual)
                got = triton_merge_wavg(merge, branch, size, mod, residual=residual)
                # the kernels on the sum torch writes, bitwise. The interpreter converts fp32 to
                # bf16 by truncation (a GPU, like torch, rounds to nearest), so for a bf16 sum the
                # sum it is compared with is truncated alike
                total = residual + branch
                if total.dtype == torch.bfloat16:
                    wide = residual.float() + branch.float()
                    total = (wide.view(torch.int32) & -65536).view(torch.float32).bfloat16()
                summed = triton_merge_wavg(merge, total, size, mod)
            for g, s in zip(got, summed):
                assert g.dtype == s.dtype == torch.promote_types(res_dtype, branch_dtype), (g.dtype, s.dtype)
                assert torch.equal(g, s), (res_dtype, branch_dtype, prefix, pyra)
            if res_dtype == branch_dtype == torch.float32:  # and the torch merge of the sum
                want = merge_wavg(merge, residual + branch, size, modulate=mod)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            cases += 1
# a residual the kernels cannot read (fp64, a broadcast) is torch's sum, then its merge
merge, _ = bipartite_soft_matching(torch.randn(2, 197, 8), 20, 1)
x = torch.randn(2, 197, 40)
for residual in (torch.randn(2, 197, 40, dtype=torch.float64), torch.randn(1, 197, 40)):
    assert not kernel_applies(merge, x, None, None, residual)
    got = triton_merge_wavg(merge, x, None, None, residual=residual)
    want = merge_wavg(merge, residual + x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    cases += 1
# where autograd records it, torch adds and merges
trained = x.clone().requires_grad_()
assert not kernel_applies(merge, x, None, None, trained)
print("cases", cases)
"""


def test_the_merge_kernels_add_the_residual_as_they_read_under_the_interpreter() -> None:
    """fp32, bf16/fp16 branches on an fp32 stream (autocast), fp16 and bf16 models: exactly the
    kernels' result on the sum torch would write, bitwise, in its dtype (for bf16 the sum as the
    interpreter rounds it: by truncation; fp32 also within 1e-5 of the torch merge), ToMe and
    PYRA, 0/1/4 prefix tokens at the largest merge_r; torch where the kernels cannot read the
    residual or autograd records the merge."""
    assert "cases 32" in run_interpreted(_RESIDUAL_CHECK)


_BLOCK_CHECK = """
import timm, torch
import pyra_lightning.kernels.merging as merging
from pyra_lightning import apply_merging
torch.manual_seed(0)
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
x = torch.randn(2, 3, 32, 32)
logits, residuals = {}, []
launch = merging.launch_merge
def recorded(*args):
    residuals.append(args[5] is not None)
    return launch(*args)
merging.launch_merge = recorded
for merger in ("wavg", "triton"):
    apply_merging(model, [12, 0, 6, 4], pyra=True, matcher="triton", merger=merger)
    with torch.no_grad():
        if merger == "wavg":
            for block in model.blocks:
                if block.pyra is not None:
                    block.pyra.weight_d.add_(torch.randn_like(block.pyra.weight_d))
        logits[merger] = model(x)
assert residuals == [True, True, True], residuals  # three merging blocks, each handed the residual
torch.testing.assert_close(logits["triton"], logits["wavg"], rtol=1e-5, atol=1e-5)
# tracing sources (visualisation) needs the sum itself: the block adds, the merger merges it
apply_merging(model, [12, 0, 6, 4], pyra=True, matcher="triton", merger="triton", trace_source=True)
residuals.clear()
with torch.no_grad():
    traced = model(x)
assert residuals == [False, False, False], residuals
torch.testing.assert_close(traced, logits["wavg"], rtol=1e-5, atol=1e-5)
print("fused in the block")
"""


def test_a_merging_block_hands_the_triton_merger_its_residual_and_branch_apart() -> None:
    """A ViT with the Triton merger: each merging block passes the residual stream and the
    attention branch to the merger unsummed (a block with merge_r 0 adds them itself), with the
    ``"wavg"`` rule's logits; with ``trace_source`` the block sums them, as the sources need."""
    assert "fused in the block" in run_interpreted(_BLOCK_CHECK)


def test_the_sum_dtype_is_torchs_promotion_of_every_pair_the_kernels_take() -> None:
    import torch

    from pyra_lightning.kernels.merging import KERNEL_DTYPES, sum_dtype

    for a in KERNEL_DTYPES:
        for b in KERNEL_DTYPES:
            assert sum_dtype(a, b) == torch.promote_types(a, b), (a, b)
