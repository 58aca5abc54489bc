"""The ``"triton"`` proportional attention (``kernels.proportional``) under Triton's CPU interpreter:
the kernel against SDPA with the ``log(size)`` mask, its fallbacks, and a model attending with it
eager, compiled and exported."""

from __future__ import annotations

import pytest
import torch
from test_kernels import REPO, run_interpreted

from pyra_lightning.kernels import triton_available
from pyra_lightning.kernels.attention import ATTENTIONS

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

_KERNEL_CHECK = """
import torch, torch.nn.functional as F
import pyra_lightning.kernels.proportional as proportional
from pyra_lightning.kernels.proportional import kernel_applies, triton_proportional_attention
torch.manual_seed(0)
cases = 0
# odd token counts (none a multiple of the 64-token tiles), heads of 16-128 channels, one of 24
for batch, heads, tokens, head_dim in ((2, 3, 37, 16), (1, 2, 5, 64), (3, 2, 70, 24), (1, 1, 130, 128), (2, 4, 197, 64)):
    qkv = torch.randn(batch, tokens, 3, heads, head_dim)  # timm's layout: q, k, v are strided views
    size = torch.randint(1, 40, (batch, tokens, 1)).float()
    size[:, 0] = 1.0
    mask = size.log().view(batch, 1, 1, tokens)
    q64, k64, v64 = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask.double())
    for dtype, tol in ((torch.float32, 2e-6), (torch.float16, 3e-3)):
        q, k, v = qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
        assert kernel_applies(q, k, v, size, 0.0)
        got = triton_proportional_attention(q, k, v, size)
        assert got.dtype == dtype and got.shape == q.shape
        assert got.transpose(1, 2).is_contiguous()  # (B, N, H, d) memory: timm's reshape is a view
        error = (got.double() - want).abs().max().item()
        assert error < tol, (batch, heads, tokens, head_dim, dtype, error)
        if dtype == torch.float16:  # no worse than SDPA's own fp16 path, up to rounding
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.half())
            assert error <= 2 * (sdpa.double() - want).abs().max().item() + 1e-4
        cases += 1
# sizes all one: plain attention
q, k, v = torch.randn(3, 2, 3, 50, 32).unbind(0)
got = triton_proportional_attention(q, k, v, torch.ones(2, 50, 1))
torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
# bf16 sizes (a model held in bf16) are read as they are
size = torch.randint(1, 9, (2, 50, 1)).to(torch.bfloat16)
got = triton_proportional_attention(q, k, v, size)
want = F.scaled_dot_product_attention(q, k, v, attn_mask=size.float().log().view(2, 1, 1, 50))
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

# the fallbacks run SDPA with the mask, never the kernel
def no_launch(*args):
    raise AssertionError("the kernel launched")
proportional.launch_attention = no_launch
size = torch.randint(1, 5, (2, 50, 1)).float()
mask = size.log().view(2, 1, 1, 50)
torch.testing.assert_close(triton_proportional_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))
got = triton_proportional_attention(q.double(), k.double(), v.double(), size.double())  # fp64
torch.testing.assert_close(got, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double()))
torch.manual_seed(1)
drop = triton_proportional_attention(q, k, v, size, 0.5)  # attention dropout
torch.manual_seed(1)
torch.testing.assert_close(drop, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5))
trained = q.clone().requires_grad_()  # autograd records it: SDPA, which has a backward
triton_proportional_attention(trained, k, v, size).sum().backward()
assert trained.grad is not None and trained.grad.abs().sum() > 0
print("cases", cases)
"""


def test_the_attention_kernel_equals_sdpa_with_the_log_size_mask_under_the_interpreter() -> None:
    """fp32 within 2e-6 and fp16 within 3e-3 of fp64 SDPA with the mask (fp16 no worse than SDPA's
    own fp16), on token counts no tile divides and strided q/k/v; SDPA where the kernel does not
    apply (no sizes, fp64, dropout, autograd)."""
    assert "cases 10" in run_interpreted(_KERNEL_CHECK)


_MODEL_CHECK = """
import timm, torch
import pyra_lightning.kernels.proportional as proportional
from pyra_lightning import apply_merging
from pyra_lightning.patch import attention_kernel
torch.manual_seed(0)
launches = []
launch = proportional.launch_attention
def counted(*args):
    launches.append(args[0].shape)
    return launch(*args)
proportional.launch_attention = counted
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=5)
x = torch.randn(2, 3, 32, 32)
for family, extra in (("vit_tiny_patch16_224", {}), ("eva02_base_patch14_224", {})):
    logits = {}
    for kernel in ("sdpa", "triton"):
        torch.manual_seed(0)  # the same weights for both
        model = timm.create_model(family, **{**kw, **extra}).eval()
        apply_merging(model, merge_r=6, pyra=True, matcher="triton", merger="triton", attention=kernel)
        assert attention_kernel(model) == kernel
        with torch.no_grad():
            for block in model.blocks:
                block.pyra.weight_d.add_(torch.randn_like(block.pyra.weight_d))
            launches.clear()
            logits[kernel] = model(x)
    # the first block has no sizes yet (flash-eligible SDPA); every later block launches once
    assert len(launches) == 2, (family, launches)
    torch.testing.assert_close(logits["triton"], logits["sdpa"], rtol=1e-5, atol=1e-5)

# the operator torch.compile keeps (its compiled use is in test_kernels' compile check)
q, k, v = torch.randn(3, 2, 3, 17, 16).unbind(0)
torch.library.opcheck(torch.ops.pyra_lightning.proportional_attention, (q, k, v, torch.rand(2, 17, 1) + 1))
print("same logits")
"""


@pytest.mark.slow
def test_a_model_attending_with_the_kernel_has_the_logits_of_sdpa() -> None:
    """ViT and EVA-02 (the Eva family, rotary embeddings) with ``attention="triton"``: the kernel
    launches in every block that has sizes and gives SDPA's logits; its operator passes
    ``torch.library.opcheck``."""
    assert "same logits" in run_interpreted(_MODEL_CHECK)


def test_the_triton_attention_is_a_registered_kernel_that_runs_sdpa_on_a_cpu() -> None:
    """Without the interpreter (this process) a CPU model attends through SDPA with the mask."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 16) for _ in range(3))
    size = torch.randint(1, 5, (2, 21, 1)).float()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=size.log().view(2, 1, 1, 21))
    torch.testing.assert_close(ATTENTIONS["triton"](q, k, v, size, 0.0), want)


_MICRO_CHECK = f"""
import sys, torch
sys.path.insert(0, {str(REPO / "scripts")!r})
from gpu_kernels import _attention
result = _attention(torch.device("cpu"), dry_run=True)
assert result["triton_max_abs_diff_vs_fp32"] < 1e-5, result
assert result["triton_ms"] > 0 and result["sdpa_masked_ms"] > 0, result
print("timed", sorted(result))
"""


def test_the_gpu_checks_attention_benchmark_runs_the_kernel_under_the_interpreter() -> None:
    """The kernels part's attention micro-benchmark (``scripts/gpu_kernels.py``) on its dry-run
    shape: the kernel path it takes on a GPU runs and agrees with fp32 SDPA."""
    assert "timed" in run_interpreted(_MICRO_CHECK)
