"""The Triton merge kernel writes the block's norm2 of the tokens it merged (``kernels.merge_norm``),
under Triton's CPU interpreter: the merged tokens and sizes bitwise those of the merge alone, the
norm within rounding of ``norm2`` on them, in the dtype the MLP reads; torch's norm wherever the
kernel's would not be the block's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_kernels import run_interpreted

from pyra_lightning.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
REPO = Path(__file__).resolve().parents[1]

_PREAMBLE = """
import timm, torch
from torch import nn
import pyra_lightning.kernels.merging as merging
from pyra_lightning.kernels.merge_norm import triton_merge_wavg_norm
from pyra_lightning.kernels.merging import triton_merge_wavg
from pyra_lightning.merge import bipartite_soft_matching, max_merge_r
from pyra_lightning.modulation import PyraModulation
torch.manual_seed(0)
normed_launches = []  # per merge launch: whether it wrote a norm
launch = merging.launch_merge
def recorded(*args):
    normed_launches.append(len(args) > 6 and args[6] is not None)
    return launch(*args)
merging.launch_merge = recorded

def layer_norm(dim, dtype):
    norm = nn.LayerNorm(dim, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm

def modulation(merge_r, dim, dtype):
    mod = PyraModulation(merge_r, dim).to(dtype)
    with torch.no_grad():  # W_D starts at 0 (the identity): give every weight a value
        for param in mod.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return mod
"""

_KERNEL_CHECK = (
    _PREAMBLE
    + """
cases = 0
# (residual, branch) dtypes: fp32; autocast's fp32 stream + bf16 branch; a model held in fp16;
# one held in bf16 with its norm weights in fp32 (the mixed pair layer_norm accepts on CPU).
# Widths of one channel tile (24, 40) and of several, the last one partial (300)
for res_dtype, branch_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)):
    dtype = torch.promote_types(res_dtype, branch_dtype)
    for prefix, tokens, dim in ((0, 38, 40), (1, 197, 300), (4, 21, 24)):
        merge_r = max_merge_r(tokens, prefix)
        merge, _ = bipartite_soft_matching(torch.randn(2, tokens, 8), merge_r, prefix)
        norm = layer_norm(dim, torch.float32 if dtype == torch.bfloat16 else dtype)
        for pyra in (False, True):
            mod = modulation(merge_r, dim, dtype) if pyra else None
            residual = torch.randn(2, tokens, dim).to(res_dtype) * 3 + 1  # a mean and spread to remove
            branch = torch.randn(2, tokens, dim).to(branch_dtype)
            size = torch.randint(1, 5, (2, tokens, 1)).to(res_dtype) if pyra else None
            with torch.no_grad():
                normed_launches.clear()
                got = triton_merge_wavg_norm(merge, branch, size, mod, residual, norm)
                assert normed_launches == [True], normed_launches
                merged, merged_size = triton_merge_wavg(merge, branch, size, mod, residual=residual)
                want = norm(merged)
            assert torch.equal(got[0], merged) and torch.equal(got[1], merged_size), (dtype, prefix, pyra)
            assert got[2].dtype == want.dtype == dtype, (got[2].dtype, want.dtype)
            # fp16: one unit in the last place; bf16: two (the interpreter truncates where a GPU rounds)
            ulp = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -6}[dtype]
            torch.testing.assert_close(got[2], want, rtol=ulp, atol=ulp)
            cases += 1

# under autocast the norm is written in the dtype the MLP's fc1 reads, bf16 or fp16: its values
# are autocast's cast of the fp32 norm (the interpreter truncates where a GPU rounds: 2 ulp)
merge, _ = bipartite_soft_matching(torch.randn(2, 197, 8), 64, 1)
norm, mod = layer_norm(300, torch.float32), modulation(64, 300, torch.float32)
for low, ulp in ((torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
    residual, branch = torch.randn(2, 197, 300), torch.randn(2, 197, 300).to(low)
    with torch.no_grad(), torch.autocast("cpu", low):
        normed_launches.clear()
        merged, _, normed = triton_merge_wavg_norm(merge, branch, None, mod, residual, norm, low)
        assert normed_launches == [True] and normed.dtype == low and merged.dtype == torch.float32
        torch.testing.assert_close(normed.float(), norm(merged).to(low).float(), rtol=ulp, atol=ulp)
        cases += 1
print("cases", cases)
"""
)


def test_the_merge_kernel_writes_norm2_of_the_tokens_it_merged_under_the_interpreter() -> None:
    """fp32, an fp32 stream with a bf16 branch, fp16, bf16 with fp32 norm weights; ToMe and PYRA; 0/1/4 prefix tokens at the
    largest merge_r; one channel tile and several (C 300, the last partial): merged tokens and sizes
    bitwise the merge's alone, the norm within rounding of ``LayerNorm`` on them in its dtype, and
    under autocast in the dtype the MLP reads (bf16 or fp16)."""
    assert "cases 26" in run_interpreted(_KERNEL_CHECK)


_FALLBACK_CHECK = (
    _PREAMBLE
    + """
from timm.layers import LayerNorm, RmsNorm
merge, _ = bipartite_soft_matching(torch.randn(2, 38, 8), 12, 1)
residual, branch = torch.randn(2, 38, 40), torch.randn(2, 38, 40)
fast = LayerNorm(40)
fast._fast_norm = True  # timm's fast norm normalises in low precision: not the kernel's
plain_timm, trained = LayerNorm(40), layer_norm(40, torch.float32).requires_grad_()
cases = {
    "timm fast norm": (fast, None, False),
    "no affine": (nn.LayerNorm(40, elementwise_affine=False), None, False),
    "another norm": (RmsNorm(40), None, False),
    "another width": (nn.LayerNorm(20), None, False),
    "autocast, the MLP's dtype unknown": (layer_norm(40, torch.float32), None, True),
    "a forward hook": (layer_norm(40, torch.float32), None, False),
    "bf16 weights, fp32 tokens": (layer_norm(40, torch.bfloat16), None, False),
    "fp64 weights, fp32 tokens": (layer_norm(40, torch.float64), None, False),
    # CPU autocast leaves layer_norm alone (CUDA's runs it in fp32): still torch's mixed-dtype error
    "bf16 weights, fp32 tokens, CPU autocast": (layer_norm(40, torch.bfloat16), torch.bfloat16, True),
}
hooked = []
cases["a forward hook"][0].register_forward_hook(lambda module, args, out: hooked.append(out.shape))
refused = {name for name in cases if name == "another width" or "weights" in name}
for name, (norm, norm_dtype, autocast) in cases.items():
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        normed_launches.clear()
        if name in refused:  # torch's own error, as the block would raise it
            try:
                triton_merge_wavg_norm(merge, branch, None, None, residual, norm, norm_dtype)
            except RuntimeError:
                continue
            raise AssertionError(f"{name}: the norm ran")
        got = triton_merge_wavg_norm(merge, branch, None, None, residual, norm, norm_dtype)
        want = triton_merge_wavg(merge, branch, None, None, residual=residual)
        assert normed_launches == [False, False], (name, normed_launches)  # the merge alone, twice
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], norm(want[0])), name
assert len(hooked) == 2, hooked  # the hooked norm ran for the merger's result and for `want`
# autograd records a norm whose weights train: torch's norm, with its graph
normed_launches.clear()
got = triton_merge_wavg_norm(merge, branch, None, None, residual, trained)
assert normed_launches == [False] and got[2].requires_grad
# timm's LayerNorm without fast norm is the plain one: fused
with torch.no_grad():
    got = triton_merge_wavg_norm(merge, branch, None, None, residual, plain_timm)
assert normed_launches[-1] is True
print("torch where the kernel is not the block's norm")
"""
)


def test_norms_the_kernel_would_not_compute_alike_run_in_torch() -> None:
    """timm's fast norm (low precision), a LayerNorm without affine weights, an RMSNorm, a norm
    of another width or weights of another dtype (torch's error), autocast without the MLP's
    dtype, a norm with a forward hook (which runs) and weights that train all get torch's norm
    after the merge alone; timm's plain ``LayerNorm`` is fused."""
    assert "torch where the kernel is not the block's norm" in run_interpreted(_FALLBACK_CHECK)


_BLOCK_CHECK = (
    _PREAMBLE
    + """
from pyra_lightning import apply_merging
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
x = torch.randn(2, 3, 32, 32)
apply_merging(model, [12, 0, 6, 4], pyra=True, matcher="triton", merger="wavg")
with torch.no_grad():
    for block in model.blocks:
        if block.pyra is not None:
            block.pyra.weight_d.add_(torch.randn_like(block.pyra.weight_d))
    want = model(x)
    with torch.autocast("cpu", torch.bfloat16):
        want_bf16 = model(x)
apply_merging(model, [12, 0, 6, 4], pyra=True, matcher="triton", merger="triton")
with torch.no_grad():
    normed_launches.clear()
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert normed_launches == [True, True, True], normed_launches  # the three merging blocks
    normed_launches.clear()
    with torch.autocast("cpu", torch.bfloat16):  # fc1 is a plain Linear: the norm is written in bf16
        got_bf16 = model(x)
    assert normed_launches == [True, True, True], normed_launches
    torch.testing.assert_close(got_bf16, want_bf16, rtol=0.05, atol=0.05)  # the torch rule's bf16 matmuls
    rule = type(model.blocks[0].merger)  # the same kernels with torch's norm2 after them
    rule.fuses_norm = False
    normed_launches.clear()
    with torch.autocast("cpu", torch.bfloat16):
        unfused_bf16 = model(x)
    assert normed_launches == [False, False, False], normed_launches
    # fc1's bf16 input rounded once either way (the interpreter truncates): 2 ** -9 measured
    torch.testing.assert_close(got_bf16, unfused_bf16, rtol=2 ** -6, atol=2 ** -6)
    rule.fuses_norm = True
# LoRA not folded: fc1 is a LoRALinear, whose input dtype under autocast the block does not assume
from pyra_lightning.lora import LoRALinear
for block in model.blocks:
    block.mlp.fc1 = LoRALinear.from_linear(block.mlp.fc1, lora_rank=2)
with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
    normed_launches.clear()
    model(x)
assert normed_launches == [False, False, False], normed_launches
# an Eva (pre-norm, rotary embeddings, SwiGLU): norm2 is the kernel's outside autocast
torch.manual_seed(0)
eva = timm.create_model("eva02_base_patch14_224", **kw).eval()
outputs = {}
for merger in ("wavg", "triton"):
    apply_merging(eva, [12, 0, 6, 4], pyra=True, matcher="triton", merger=merger)
    with torch.no_grad():
        normed_launches.clear()
        outputs[merger] = eva(x)
# per merging block: the tokens with their norm2, then the rotary embeddings (no norm)
assert normed_launches == [True, False] * 3, normed_launches
torch.testing.assert_close(outputs["triton"], outputs["wavg"], rtol=1e-5, atol=1e-5)
print("norm2 fused in the block")
"""
)


def test_a_merging_block_takes_norm2_from_the_triton_merger() -> None:
    """A ViT with the Triton merger: each merging block's norm2 is the merge kernel's, with the
    ``"wavg"`` rule's logits in fp32 and under bf16 autocast (fc1 a plain ``Linear``), and under
    autocast within bf16 rounding of the same kernels followed by torch's norm2; with an
    unfolded LoRA fc1 under autocast the block runs norm2 itself. An Eva's merging blocks too."""
    assert "norm2 fused in the block" in run_interpreted(_BLOCK_CHECK)


_MICRO_CHECK = f"""
import sys, torch
sys.path.insert(0, {str(REPO / "scripts")!r})
from gpu_kernels import _merger
result = _merger(torch.device("cpu"), dry_run=True)
assert result["max_abs_diff"] < 1e-5, result
assert result["norm2_merged_equal"] is True, result
assert result["norm2_max_abs_diff"] <= 2 ** -5, result  # within bf16 rounding of values below 4
print("timed", sorted(result))
"""


def test_the_gpu_checks_merge_benchmark_runs_the_fused_norm_under_the_interpreter() -> None:
    """The kernels part's merge micro-benchmark (``scripts/gpu_kernels.py``) on its dry-run shape:
    the fused ``norm2`` it times on a GPU writes the merge kernel's tokens and torch's norm."""
    assert "timed" in run_interpreted(_MICRO_CHECK)


def test_the_mlp_input_dtype_is_assumed_only_for_a_plain_unhooked_fc1() -> None:
    """Under autocast a timm ``Mlp`` reads its input in the autocast dtype, so the merge kernel
    may write norm2 in it; not once ``fc1`` has a pre-hook, which would see the other dtype."""
    import torch
    from timm.layers import Mlp

    from pyra_lightning.patch_common import mlp_input_dtype

    mlp, x = Mlp(8, 16), torch.randn(2, 3, 8)
    assert mlp_input_dtype(mlp, x) is None  # no autocast: the norm's own dtype
    with torch.autocast("cpu", torch.bfloat16):
        assert mlp_input_dtype(mlp, x) is torch.bfloat16
        handle = mlp.fc1.register_forward_pre_hook(lambda module, args: None)
        assert mlp_input_dtype(mlp, x) is None
        handle.remove()
        assert mlp_input_dtype(mlp, x) is torch.bfloat16
