"""The Triton matcher and merge kernels under Triton's CPU interpreter, and FlexAttention's
proportional attention."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from pyra_lightning import apply_merging
from pyra_lightning.kernels import triton_available
from pyra_lightning.kernels.attention import ATTENTIONS, flex_proportional_attention

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
# bf16 and fp16 metrics (what autocast feeds it): matched in fp32, as torch matches .float()
for dtype in (torch.bfloat16, torch.float16):
    for prefix in (0, 1, 4):
        metric = torch.randn(3, 197, 64).to(dtype)
        got, want = triton_match(metric, 16, prefix), match(metric.float(), 16, prefix)
        for name, g, w in zip(("src", "dst", "unm"), got, want):
            assert torch.equal(g, w), (dtype, prefix, name)
        cases += 1
print("cases", cases)
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_matcher_equals_the_torch_matcher_under_the_interpreter() -> None:
    """Odd token counts, 0-4 prefix tokens, merge_r 1 and at its maximum, fp32, random data; and
    bf16 / fp16 metrics against the torch matcher on their fp32 values (the kernel upcasts: a
    bf16 ``tl.dot`` would be unchecked here, the interpreter multiplies bf16 bit patterns)."""
    assert "cases 36" in run_interpreted(_CHECK)


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


# a PYRA modulation with every weight drawn: the interpreter scripts' (``from pyra_lightning.modulation
# import PyraModulation`` and ``torch`` imported before it)
MODULATION_HELPER = """
def modulation(merge_r, dim, elastic=False):
    mod = PyraModulation(merge_r, dim, elastic=elastic)
    with torch.no_grad():  # W_D starts at 0 (the identity): give every weight a value
        for param in mod.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return mod
"""


_MERGE_CHECK = (
    """
import torch
from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg
from pyra_lightning.merge import bipartite_soft_matching, max_merge_r, merge_wavg
from pyra_lightning.modulation import PyraModulation
torch.manual_seed(0)

"""
    + MODULATION_HELPER
    + """
def check(x, size, merge, mod, tol):
    with torch.no_grad():
        assert kernel_applies(merge, x, size, mod)
        got, want = triton_merge_wavg(merge, x, size, mod), merge_wavg(merge, x, size, mod)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)

cases = 0
for prefix in range(5):
    for tokens in (17, 38, 197):  # none a multiple of 16
        for merge_r in sorted({1, max_merge_r(tokens, prefix)}):
            for pyra in (False, True):
                x = torch.randn(3, tokens, 40)  # 40 channels: not a power of 2
                size = torch.randint(1, 5, (3, tokens, 1)).float() if (tokens + prefix) % 2 else None
                merge, _ = bipartite_soft_matching(torch.randn(3, tokens, 8), merge_r, prefix)
                check(x, size, merge, modulation(merge_r, 40) if pyra else None, 1e-5)
                cases += 1
# an elastic layer built for more pairs than this layer merges: its first rows of W_r
merge, _ = bipartite_soft_matching(torch.randn(2, 197, 8), 20, 1)
check(torch.randn(2, 197, 40), torch.rand(2, 197, 1) + 1, merge, modulation(32, 40, elastic=True), 1e-5)
# sizes as the previous merge leaves them: a view with the token stride of its (B, N, C + 1) sum
wide = torch.rand(2, 197, 41) + 1
check(torch.randn(2, 197, 40), wide[..., 40:], merge, modulation(20, 40), 1e-5)
# 200 channels (two channel blocks of the merge kernel), tokens with a channel stride of 2
check(torch.randn(2, 197, 400)[..., ::2], torch.rand(2, 197, 1) + 1, merge, modulation(20, 200), 1e-5)
merge_tome, _ = bipartite_soft_matching(torch.randn(2, 197, 8), 20, 1)
check(torch.randn(2, 197, 400)[..., ::2], None, merge_tome, None, 1e-5)
# bf16 and fp16 tokens: the kernel computes in fp32, the torch path in their precision
x = torch.randn(2, 197, 40).bfloat16()
check(x, None, merge, modulation(20, 40).bfloat16(), 5e-2)
check(torch.randn(2, 197, 40).half(), (torch.rand(2, 197, 1) + 1).half(), merge, None, 5e-3)
# ... and closer: within one unit in the last place of torch in fp32 on the same values, PYRA with
# sizes (the interpreter truncates to bf16 where a GPU rounds to nearest, so one ulp, not half)
for dtype in (torch.bfloat16, torch.float16):
    x, size, mod = torch.randn(2, 197, 40), torch.randint(1, 4, (2, 197, 1)).float(), modulation(20, 40)
    low = modulation(20, 40).to(dtype)
    low.load_state_dict({k: v.to(dtype) for k, v in mod.state_dict().items()})
    mod.load_state_dict({k: v.to(dtype).float() for k, v in mod.state_dict().items()})
    with torch.no_grad():
        assert kernel_applies(merge, x.to(dtype), size.to(dtype), low)
        got, got_size = triton_merge_wavg(merge, x.to(dtype), size.to(dtype), low)
        want, want_size = merge_wavg(merge, x.to(dtype).float(), size.to(dtype).float(), mod)
    info = torch.finfo(dtype)
    ulp = info.eps * 2.0 ** torch.floor(torch.log2(want.abs().clamp(min=info.tiny)))  # spacing at want
    assert ((got.float() - want).abs() <= ulp).all(), (dtype, ((got.float() - want).abs() / ulp).max())
    assert torch.equal(got_size.float(), want_size), dtype
    cases += 1
# fp64 is left to torch (the kernels would compute it in fp32)
assert not kernel_applies(merge, torch.randn(2, 197, 40, dtype=torch.float64), None, None)
# where autograd records the merge, only callers with the operator's backward launch the kernels
mod = modulation(20, 40)
assert not kernel_applies(merge, x.float(), None, mod)
assert kernel_applies(merge, x.float(), None, mod, differentiable=True)
with torch.no_grad():
    assert kernel_applies(merge, x.float(), None, mod)
# ... and never for sizes that require a gradient (the backward gives sizes none)
trained_size = torch.ones(2, 197, 1, requires_grad=True)
assert not kernel_applies(merge, x.float(), trained_size, mod, differentiable=True)
mod.variant = "w_r"  # an ablation: not eqs. 4-7, so not the kernel's
with torch.no_grad():
    assert not kernel_applies(merge, x.float(), None, mod)
print("cases", cases + 6)
"""
)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_merge_kernels_equal_the_torch_merge_under_the_interpreter() -> None:
    """ToMe and PYRA (eqs. 4-7), with and without sizes, odd token and channel counts, 0-4 prefix
    tokens, merge_r 1 and at its maximum, an elastic layer, strided sizes and tokens, two channel
    blocks, bf16 and fp16, against ``merge_wavg``; the kernels where autograd records the merge
    only for a caller with the backward, never for sizes that require a gradient, and not for fp64."""
    assert "cases 68" in run_interpreted(_MERGE_CHECK)


_MERGER_MODEL_CHECK = """
import timm, torch
from pyra_lightning import apply_merging
from pyra_lightning.merge_rules import MERGERS
import pyra_lightning.kernels.merging as kernels
assert "triton" in MERGERS

def fell_back(*args, **kwargs):
    raise AssertionError("the triton merger ran the torch path")

kernels.merge_wavg = fell_back  # the kernels must run (the "wavg" rule holds its own reference)
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
for name, extra in (("vit_tiny_patch16_224", {}), ("eva02_base_patch14_224", {}),
                    ("vit_base_patch16_dinov3_qkvb", {})):  # ViT; Eva with rope; 4 storage tokens
    torch.manual_seed(0)
    model = timm.create_model(name, **kw, **extra).eval()
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for matcher, merger in (("bipartite", "wavg"), ("triton", "triton")):
        apply_merging(model, [12, 8, 6, 4], pyra=True, matcher=matcher, merger=merger)
        with torch.no_grad():
            if merger == "wavg":  # the second call keeps these PYRA layers (same merge_r)
                for block in model.blocks:
                    for param in block.pyra.parameters():
                        param.add_(torch.randn_like(param) * 0.2)
            outputs[merger] = model(x)
    torch.testing.assert_close(outputs["triton"], outputs["wavg"], rtol=1e-4, atol=1e-4)
    print("same output", name)
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_triton_merger_is_a_registered_merge_rule_with_the_same_model_output() -> None:
    """``apply_merging(..., matcher="triton", merger="triton")`` on a ViT, an Eva with rotary
    embeddings and a 4-register model: the logits of the torch rule, under the interpreter."""
    out = run_interpreted(_MERGER_MODEL_CHECK)
    assert out.count("same output") == 3, out


_FLOPS_CHECK = """
import timm, torch
from pyra_lightning import apply_merging, count_flops
from pyra_lightning.accounting import flop_counter_mode
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
counts = {}
for rule in ("bipartite", "triton"):
    apply_merging(model, [12, 8, 6, 4], pyra=True, matcher=rule, merger="wavg" if rule == "bipartite" else rule)
    counts[rule] = count_flops(model)
with torch.no_grad(), flop_counter_mode() as counter:  # the kernels themselves: invisible to it
    model(torch.zeros(1, 3, 32, 32))
assert model.blocks[0].matcher.name == "triton" and model.blocks[0].merger.name == "triton"
assert counts["triton"] == counts["bipartite"] > counter.get_total_flops(), (counts, counter.get_total_flops())
print("counted", counts["triton"], "kernels", counter.get_total_flops())
"""


_COMPILE_CHECK = """
import timm, torch
import pyra_lightning
import pyra_lightning.kernels.matching as matching, pyra_lightning.kernels.merging as merging
import pyra_lightning.kernels.proportional as proportional
from pyra_lightning import apply_merging
torch.manual_seed(0)
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=5)
model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
apply_merging(model, merge_r=8, pyra=True, matcher="triton", merger="triton", attention="triton")
with torch.no_grad():  # W_D starts at 0 (the identity): give the modulation a value
    for block in model.blocks:
        block.pyra.weight_d.add_(torch.randn_like(block.pyra.weight_d))
x = torch.randn(2, 3, 32, 32)

# the library's own check of each operator: schema, fake (shape) kernel, tracing
metric = torch.randn(2, 17, 8)
torch.library.opcheck(torch.ops.pyra_lightning.match_plan, (metric, 4, 1))
merge = pyra_lightning.merge.bipartite_soft_matching(metric, 4, 1)[0]
tokens, size = torch.randn(2, 17, 24), torch.rand(2, 17, 1) + 1
pyra = pyra_lightning.modulation.PyraModulation(4, 24)
with torch.no_grad():
    pyra.weight_d.add_(1.0)
    args = (tokens, size, merge.perm(True).contiguous(), merge.dst_out.contiguous(),
            pyra.norm.weight, pyra.norm.bias, pyra.weight_r, pyra.weight_d, pyra.norm.eps)
    torch.library.opcheck(torch.ops.pyra_lightning.merge_wavg, args)
    torch.library.opcheck(torch.ops.pyra_lightning.merge_wavg, (*args[:4], None, None, None, None, 0.0))
    ln = torch.nn.LayerNorm(24)
    for dtype in (torch.float32, torch.bfloat16):  # the norm in the tokens' dtype, or the MLP's
        ln_args = (None, ln.weight, ln.bias, ln.eps, dtype)
        torch.library.opcheck(torch.ops.pyra_lightning.merge_wavg_norm, (*args, *ln_args))
        torch.library.opcheck(torch.ops.pyra_lightning.merge_wavg_norm, (*args[:4], None, None, None, None, 0.0, *ln_args))

# compiled: one node per operator and layer in the graph torch.compile hands its backend
nodes = []
def record(gm, inputs):
    nodes.extend(str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function")
    return gm.forward
with torch.no_grad():
    want = model(x)
    got = torch.compile(model, backend=record, fullgraph=True)(x)
assert nodes.count("pyra_lightning.match_plan") == 3 and nodes.count("pyra_lightning.merge_wavg_norm") == 3, nodes
assert sum("layer_norm" in n for n in nodes) == 3 + 1, nodes  # norm1s and the final norm: norm2 is the merge kernel's
assert nodes.count("pyra_lightning.proportional_attention") == 2, nodes  # the blocks with sizes
torch.testing.assert_close(got, want, rtol=0, atol=0)

# the inductor engine launches the kernels (counted at their launch functions) and agrees
launches = {"match": 0, "merge": 0, "attention": 0}
match_plan, launch_merge = matching.triton_match_plan, merging.launch_merge
launch_attention = proportional.launch_attention
def counted_match(*args):
    launches["match"] += 1
    return match_plan(*args)
def counted_merge(*args):
    launches["merge"] += 1
    return launch_merge(*args)
def counted_attention(*args):
    launches["attention"] += 1
    return launch_attention(*args)
matching.triton_match_plan, merging.launch_merge = counted_match, counted_merge
proportional.launch_attention = counted_attention
run = pyra_lightning.compile_for_inference(model, x, engine="inductor")
launches.update(match=0, merge=0, attention=0)
torch.testing.assert_close(run(x), want, rtol=1e-5, atol=1e-5)
assert launches == {"match": 3, "merge": 3, "attention": 2}, launches

# an export takes the torch rule: its graph must run where Triton and this package are not
exported = torch.export.export(model, (x,))
assert not [n for n in exported.graph.nodes if "pyra_lightning" in str(n.target)]
torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)
print("compiled with the kernels")
"""


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_compiled_models_keep_the_triton_kernels_and_exports_do_not() -> None:
    """The kernels are custom operators (``pyra_lightning::match_plan``, ``::merge_wavg``, ``::merge_wavg_norm`` and
    ``::proportional_attention``): ``torch.library.opcheck`` passes for the first two (the third's
    is in test_proportional_kernel), a compiled ``"triton"`` model holds one node of each per
    merging layer (attention: per block with sizes) and launches them under the inductor engine
    with eager's output, and an export has the torch rule and SDPA."""
    assert "compiled with the kernels" in run_interpreted(_COMPILE_CHECK)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_count_flops_counts_the_triton_rules_as_the_torch_rules_they_compute() -> None:
    """Where the kernels run (CUDA; here the interpreter), a ``FlopCounterMode`` cannot see the
    matcher's score products or PYRA's matmuls; ``count_flops`` counts the torch rules instead."""
    assert "counted" in run_interpreted(_FLOPS_CHECK)


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


# ------------------------------------------------------------------ the attention kernel table
ATTENTION_MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "eva02": ("eva02_base_patch14_224", {}),  # separate q/k/v, rotary embeddings
    "pe_core": (  # grouped-query attention, attention pooling
        "vit_pe_core_base_patch16_224",
        {"embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "qkv_fused": False},
    ),
}


@pytest.mark.parametrize("family", sorted(ATTENTION_MODELS))
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_gives_the_logits_of_sdpa_on_every_family(family: str) -> None:
    """``apply_merging(..., attention="flex")``: every merged block attends through FlexAttention's
    ``score_mod`` (the sizes are not all 1 after the first merge), with SDPA's logits."""
    from pyra_lightning.patch import attention_kernel

    name, extra = ATTENTION_MODELS[family]
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    model = timm.create_model(name, pretrained=False, **{**kw, **extra}).eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=0.2)  # timm's is ~1e-5 for some
    x = torch.randn(2, 3, 32, 32)
    logits = {}
    for kernel in ("sdpa", "flex"):
        apply_merging(model, [12, 8, 6, 4], pyra=True, attention=kernel)
        assert attention_kernel(model) == kernel
        calls = []
        original = ATTENTIONS[kernel]
        ATTENTIONS[kernel] = lambda *args, original=original, calls=calls: (
            calls.append(args[3]) or original(*args)
        )
        try:
            with torch.no_grad():
                logits[kernel] = model(x)
        finally:
            ATTENTIONS[kernel] = original
        assert len(calls) == 4 and calls[0] is None and all(size is not None for size in calls[1:])
    assert logits["sdpa"].abs().max() > 0.01  # a scale at which a wrong bias would show
    torch.testing.assert_close(logits["flex"], logits["sdpa"], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_refuses_to_train_on_a_cpu_in_one_line() -> None:
    """FlexAttention has no backward on CPU: a training forward there is refused by name, not with
    torch's NotImplementedError from inside autograd; inference on the same model still runs."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    model = apply_merging(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw), 4, attention="flex"
    )
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(
        ValueError, match=r"attention='flex' cannot train on a CPU: .* train with attention='sdpa'"
    ):
        model(x)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


def test_flex_attention_refuses_attention_dropout_in_training() -> None:
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_drop_rate=0.1, **kw)
    apply_merging(model, 4, attention="flex").train()
    with pytest.raises(ValueError, match=r"attention='flex' has no attention dropout \(attn_drop_rate 0.1"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_attention_setting_reaches_the_blocks_and_the_exported_recipe(tmp_path: Path) -> None:
    """``model.merging.attention: flex`` in a run's settings: the module's blocks attend with it, the
    export records it, ``load_exported`` rebuilds it, and ONNX refuses it in one line."""
    from helpers import exported_round_trip

    from pyra_lightning.deploy import to_onnx

    _, served, x = exported_round_trip(tmp_path / "model", "flex")
    pytest.importorskip("onnxscript", reason="the onnx extra (pip install '.[onnx]') is not installed")
    with pytest.raises(ValueError, match="ONNX has no operator for FlexAttention"):
        to_onnx(served.model, tmp_path / "m.onnx", x)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_kernels_compile_for_hopper_without_spilling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter runs a kernel whatever its tiles; the GPU compiler does not. Every kernel,
    at the block sizes its launcher picks for ViT-B/16 (C 768, head 64) in bf16, with and without
    sizes, compiles for sm_90 with Triton's own ptxas, no GPU needed (``tools/aot_kernels.py``),
    and keeps its registers without spilling to the stack."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from aot_kernels import build

    rows = build("cuda:90", channels=[768], head_dim=64, dtypes=["bf16"])
    assert sorted({row.kernel for row in rows}) == [
        "attention_kernel",
        "match_kernel",
        "merge_kernel",
        "modulate_kernel",
        "pair_grad_kernel",
        "place_kernel",
        "plan_kernel",
    ]
    # 1 matcher, 2 plans (prefix or not), 1 attention, 4 modulations (sizes, residual or not),
    # 16 merges (those 4 x modulated or not x with norm2 or not); backward: 8 pair kernels
    # (residual or not x 1 to 256 pairs), 4 place kernels (residual or not x PYRA or ToMe)
    assert len(rows) == 36
    assert all(0 < row.registers <= 255 for row in rows), rows
    assert [row for row in rows if row.stack_bytes] == [], "a kernel spills registers at ViT-B/16's width"
