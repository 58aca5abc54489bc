"""The backward of the Triton merge (``kernels.merge_backward``) under Triton's CPU interpreter:
its gradients are autograd's through the torch rule, so a training step can keep the kernels."""

from __future__ import annotations

import pytest
from test_kernels import MODULATION_HELPER, REPO, run_interpreted

from pyra_lightning.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

_PRELUDE = (
    """
import torch
import pyra_lightning.kernels.merging as merging
from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg
from pyra_lightning.merge import bipartite_soft_matching, max_merge_r, merge_wavg
from pyra_lightning.modulation import PyraModulation
torch.manual_seed(0)
launches = []
launch_merge = merging.launch_merge
merging.launch_merge = lambda *args: launches.append(1) or launch_merge(*args)  # proves the kernels ran
import pyra_lightning.kernels.merge_grad as merge_grad
backward_launches = []  # the backward's kernels (kernels.merge_grad), counted the same way
kernel_backward = merge_grad.triton_merge_backward
merge_grad.triton_merge_backward = lambda *args: backward_launches.append(1) or kernel_backward(*args)

"""
    + MODULATION_HELPER
    + """
def grads(fn, x, residual, mod):
    \"\"\"The output and the gradients of x, the residual and the modulation's parameters for one
    seeded upstream gradient (the same in both runs).\"\"\"
    x = x.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    params = [] if mod is None else list(mod.parameters())
    for param in params:
        param.grad = None
    out, out_size = fn(x, residual)
    assert not out_size.requires_grad, "the sizes must not carry a gradient"
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * upstream).float().sum().backward()
    found = [out.detach(), x.grad] + ([] if residual is None else [residual.grad])
    return found + [param.grad.clone() for param in params]

def compare(merge, x, size, mod, residual, tol, reference_dtype=None, relative=False):
    \"\"\"The kernels' gradients against autograd through ``merge_wavg`` (on ``reference_dtype``
    copies of the same values where given: the kernels compute in fp32); with ``relative``,
    within ``tol`` of each tensor's largest entry (sums of many large terms, in another order).\"\"\"
    assert kernel_applies(merge, x, size, mod, residual, differentiable=True)
    before, before_backward = len(launches), len(backward_launches)
    got = grads(lambda a, r: triton_merge_wavg(merge, a, size, mod, residual=r), x, residual, mod)
    assert len(launches) == before + 1, "the kernels did not run"
    assert len(backward_launches) == before_backward + 1, "the backward's kernels did not run"
    ref_mod, cast = mod, (lambda t: t)
    if reference_dtype is not None:
        cast = lambda t: None if t is None else t.to(reference_dtype)
        ref_mod = None if mod is None else modulation(mod.weight_r.shape[0], x.shape[-1], mod.elastic)
        if mod is not None:
            ref_mod.load_state_dict({k: cast(v) for k, v in mod.state_dict().items()})
    ref_size = cast(size)
    want = grads(
        lambda a, r: merge_wavg(merge, a if r is None else r + a, ref_size, modulate=ref_mod),
        cast(x), cast(residual), ref_mod,
    )
    assert len(got) == len(want)
    assert got[1].dtype == x.dtype  # each gradient in its input's dtype
    for i, (g, w) in enumerate(zip(got, want)):
        if relative:
            error = ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
            assert error <= tol, (i, error)
        else:
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=lambda m: f"tensor {i}: {m}")
"""
)

_PARITY_CHECK = (
    _PRELUDE
    + """
cases = 0
for prefix in (0, 1, 4):
    for tokens in (17, 197):  # odd; ViT-B/16's count
        for merge_r in sorted({1, max_merge_r(tokens, prefix)}):
            for pyra in (False, True):
                for with_residual in (False, True):
                    x = torch.randn(3, tokens, 40)  # 40 channels: not a power of 2
                    residual = torch.randn(3, tokens, 40) if with_residual else None
                    size = torch.randint(1, 5, (3, tokens, 1)).float() if (tokens + prefix) % 2 else None
                    merge, _ = bipartite_soft_matching(torch.randn(3, tokens, 8), merge_r, prefix)
                    compare(merge, x, size, modulation(merge_r, 40) if pyra else None, residual, 1e-4)
                    cases += 1
# an elastic layer built for 32 pairs that merges 20: W_r's unused rows get a zero gradient
merge, _ = bipartite_soft_matching(torch.randn(2, 197, 8), 20, 1)
elastic = modulation(32, 40, elastic=True)
compare(merge, torch.randn(2, 197, 40), torch.rand(2, 197, 1) + 1, elastic, torch.randn(2, 197, 40), 1e-4)
assert elastic.weight_r.grad[20:].abs().sum() == 0 and elastic.weight_r.grad[:20].abs().sum() > 0
cases += 1
# bf16 tokens and weights (what bf16-true training feeds it), against torch in fp32 on their values
bf16 = modulation(20, 40).bfloat16()
x, residual = torch.randn(2, 197, 40).bfloat16(), torch.randn(2, 197, 40).bfloat16()
compare(merge, x, torch.rand(2, 197, 1).add(1).bfloat16(), bf16, residual, 5e-2, torch.float32)
cases += 1
# bf16-mixed, as a block calls it under autocast: a bf16 attention branch, the fp32 residual
# stream and fp32 weights, backward() inside autocast; against torch in fp32 on the same values
# (the kernels add the two streams in fp32, as torch's promotion does), within bf16's rounding of
# the branch's gradient and fp32's of the rest
mixed = modulation(20, 40)
branch, stream = torch.randn(2, 197, 40).bfloat16(), torch.randn(2, 197, 40)
mixed_size = torch.rand(2, 197, 1) + 1
with torch.autocast("cpu", dtype=torch.bfloat16):
    assert kernel_applies(merge, branch, mixed_size, mixed, stream, differentiable=True)
    before = len(backward_launches)
    got = grads(lambda a, r: triton_merge_wavg(merge, a, mixed_size, mixed, residual=r), branch, stream, mixed)
    assert len(backward_launches) == before + 1, "the backward's kernels did not run"
want = grads(lambda a, r: merge_wavg(merge, r + a, mixed_size, modulate=mixed), branch.float(), stream, mixed)
assert got[0].dtype == got[2].dtype == torch.float32 and got[1].dtype == torch.bfloat16
for i, (g, w) in enumerate(zip(got, want)):
    tol = 1e-2 if i == 1 else 1e-4
    torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol, msg=lambda m: f"bf16-mixed tensor {i}: {m}")
cases += 1
# sizes that require a gradient: refused, so the torch rule records them
trained = torch.ones(2, 197, 1, requires_grad=True)
assert not kernel_applies(merge, torch.randn(2, 197, 40), trained, None, differentiable=True)
print("cases", cases)
"""
)


def test_the_kernels_gradients_are_autograds_through_the_torch_rule() -> None:
    """ToMe and PYRA (eqs. 4-7), with and without sizes and the fused residual, 0, 1 and 4 prefix
    tokens, merge_r 1 and at its maximum; an elastic layer; bf16; bf16-mixed (a bf16 branch and
    the fp32 residual stream under autocast, backward inside it): the gradients of the tokens, the
    residual and every PYRA parameter equal autograd's through ``merge_wavg``, the merged sizes
    carry none, and each call launched the kernels."""
    assert "cases 51" in run_interpreted(_PARITY_CHECK)


_WIDE_CHECK = (
    _PRELUDE
    + """
cases = 0
# ViT-B/16's most pairs (98 of 197 tokens, 768 channels: 128 lanes, channel blocks of 16) and
# 250 pairs of 512 tokens (256 lanes, channel blocks of 8, the kernel's limit), sizes and the
# fp32 residual stream given, batch 1; ToMe at the same shapes (its one kernel, place_kernel)
for tokens, merge_r, channels in ((197, 98, 768), (512, 250, 24)):
    merge, _ = bipartite_soft_matching(torch.randn(1, tokens, 8), merge_r, 1)
    x, residual = torch.randn(1, tokens, channels) * 3 + 0.5, torch.randn(1, tokens, channels)
    size = torch.randint(1, 6, (1, tokens, 1)).float()
    for mod in (modulation(merge_r, channels), None):
        compare(merge, x, size, mod, residual, 2e-5, relative=True)  # measured: at most 5e-6
        cases += 1
grad = torch.randn(1, 4, 8)
with torch.no_grad():  # as backward() runs it
    assert merge_grad.applies(grad, 4, True) and merge_grad.applies(grad, 1000, False)
    assert not merge_grad.applies(grad, merge_grad.MAX_PAIRS + 1, True) and not merge_grad.applies(grad, 0, False)
    # traced (make_fx in real mode; fake tensors, as AOTAutograd's): the torch formula, so the graph records it
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    seen = []
    make_fx(lambda g: seen.append(merge_grad.applies(g, 4, True)) or g * 1)(grad)
    with FakeTensorMode():
        seen.append(merge_grad.applies(torch.randn(1, 4, 8), 4, True))
    assert seen == [False, False], seen
assert not merge_grad.applies(grad, 4, True)  # grad mode on: backward(create_graph=True)

# a gradient penalty (backward with create_graph=True): the kernels' launch is not differentiable,
# so that backward takes the torch formula and the penalty's gradient is autograd's
merge, _ = bipartite_soft_matching(torch.randn(2, 37, 8), 12, 1)
x0, res0, size = torch.randn(2, 37, 40), torch.randn(2, 37, 40), torch.rand(2, 37, 1) + 1
mod = modulation(12, 40)
upstream = torch.randn(2, 25, 40)

def penalised(fn):
    x, res = x0.clone().requires_grad_(), res0.clone().requires_grad_()
    mod.zero_grad(set_to_none=True)
    loss = (fn(x, res)[0] * upstream).sum()
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    assert grad_x.requires_grad
    (loss + grad_x.pow(2).sum()).backward()
    return [x.grad, res.grad] + [p.grad.clone() for p in mod.parameters()]

got = penalised(lambda a, r: triton_merge_wavg(merge, a, size, mod, residual=r))
want = penalised(lambda a, r: merge_wavg(merge, r + a, size, modulate=mod))
for i, (g, w) in enumerate(zip(got, want)):
    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"penalty tensor {i}: {m}")
cases += 1
# torch.func.jvp: the kernels stand aside (they have no forward-mode rule), so the tangent is torch's
with torch.no_grad():
    tangent = torch.randn_like(x0)
    _, got = torch.func.jvp(lambda a: triton_merge_wavg(merge, a, size, mod, residual=res0)[0], (x0,), (tangent,))
    _, want = torch.func.jvp(lambda a: merge_wavg(merge, res0 + a, size, modulate=mod)[0], (x0,), (tangent,))
assert want.abs().max() > 0
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
cases += 1
print("cases", cases)
"""
)


def test_the_backward_kernels_at_the_widest_layers_and_where_they_stand_aside() -> None:
    """The backward's kernels (``kernels.merge_grad``) at the most pairs a ViT-B/16 layer merges
    and at the kernel's limit of pairs: gradients equal autograd's through ``merge_wavg``; more
    pairs, no merge, a traced backward (``make_fx``, fake tensors) or one that must itself be
    differentiable (a gradient penalty, ``create_graph=True``) take the torch formula, and
    ``torch.func.jvp`` the torch merge, so both give autograd's results."""
    assert "cases 6" in run_interpreted(_WIDE_CHECK)


_OPCHECK = (
    _PRELUDE
    + """
merge, _ = bipartite_soft_matching(torch.randn(2, 17, 8), 4, 1)
pyra = modulation(4, 24)
perm, dst_out = merge.perm(True).contiguous(), merge.dst_out.contiguous()
weights = (pyra.norm.weight, pyra.norm.bias, pyra.weight_r, pyra.weight_d, pyra.norm.eps)
x, size = torch.randn(2, 17, 24, requires_grad=True), torch.rand(2, 17, 1) + 1
residual = torch.randn(2, 17, 24, requires_grad=True)
# with inputs that require a gradient opcheck also checks the autograd registration and the
# backward traced by AOTAutograd
for args in ((x, size, perm, dst_out, *weights), (x, size, perm, dst_out, *weights, residual),
             (x, None, merge.perm(False).contiguous(), dst_out, None, None, None, None, 0.0, residual)):
    torch.library.opcheck(torch.ops.pyra_lightning.merge_wavg, args)
print("opcheck passed")
"""
)


def test_the_merge_operator_passes_opcheck_with_inputs_that_require_a_gradient() -> None:
    assert "opcheck passed" in run_interpreted(_OPCHECK)


_TRAIN_CHECK = (
    _PRELUDE
    + """
import timm
from pyra_lightning import apply_merging
from pyra_lightning.peft import apply_lora
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = apply_lora(timm.create_model("vit_tiny_patch16_224", **kw), 4)
x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
found = {}
for matcher, merger in (("bipartite", "wavg"), ("triton", "triton")):
    apply_merging(model, [12, 8, 6, 4], pyra=True, matcher=matcher, merger=merger)
    model.train()
    if merger == "wavg":  # LoRA's B and PYRA's W_D start at 0: give every trained weight a value
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.2)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    before = len(launches) + len(backward_launches)
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    launched = len(launches) + len(backward_launches) - before
    found[merger] = (loss.detach(), {name: p.grad.clone() for name, p in trained.items()}, launched)
(loss, want, none), (got_loss, got, launched) = found["wavg"], found["triton"]
assert none == 0 and launched == 8, (none, launched)  # per block the merge and its backward, in kernels
assert any(".pyra." in name for name in got) and any("lora" in name for name in got), sorted(got)
torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
for name in want:
    torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
print("same gradients", len(want))
"""
)


def test_a_training_step_with_the_triton_merger_has_the_torch_rules_gradients() -> None:
    """A tiny LoRA ViT with PYRA layers in training mode: with ``matcher="triton",
    merger="triton"`` every block's merge runs in the kernels and the loss and the gradient of
    every LoRA and PYRA weight equal those of the torch rule (``bipartite`` + ``wavg``)."""
    out = run_interpreted(_TRAIN_CHECK)
    assert "same gradients" in out, out


_COMPILED_TRAIN_CHECK = (
    _PRELUDE
    + """
import timm
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from pyra_lightning import apply_merging
from pyra_lightning.peft import apply_lora
kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
model = apply_lora(timm.create_model("vit_tiny_patch16_224", **kw), 4)
apply_merging(model, [12, 8, 6, 4], pyra=True, matcher="triton", merger="triton")
model.train()
with torch.no_grad():  # LoRA's B and PYRA's W_D start at 0: give every trained weight a value
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn_like(param) * 0.2)
x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

def step(forward):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(forward(x), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

graphs = {"forward": [], "backward": []}
def recorder(kind):
    def compiler(gm, inputs):
        graphs[kind].extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)
    return compiler

loss, want = step(model)
compiled = torch.compile(
    model, fullgraph=True, backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
)
before, before_backward = len(launches), len(backward_launches)
got_loss, got = step(compiled)
assert len(launches) - before == 4, "the compiled step did not launch the kernels"
assert len(backward_launches) == before_backward, "a traced backward is the torch formula, for inductor"
assert sum("merge_wavg" in n for n in graphs["forward"]) == 4, graphs["forward"]
backward = graphs["backward"]
assert not any("merge_wavg" in n for n in backward) and any("scatter" in n for n in backward), backward
torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
for name in want:
    torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
print("compiled, same gradients", len(want))
"""
)


def test_a_compiled_training_step_traces_the_merges_backward_into_its_graph() -> None:
    """``torch.compile`` of the same training step (AOTAutograd, graphs recorded): each block's
    merge is one ``merge_wavg`` node of the forward graph, its backward is the torch formula
    traced into the backward graph, and the gradients equal the eager step's."""
    out = run_interpreted(_COMPILED_TRAIN_CHECK)
    assert "compiled, same gradients" in out, out


def test_a_training_step_on_the_merge_kernels_issues_fewer_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    """One eager ViT-B/16 PYRA-high training step (LoRA rank 8; forward, loss, backward) on the
    meta device, launches recorded (``tools/count_ops.py --train``): with the Triton matcher, the
    merge kernels and their backward (``kernels.merge_grad``) launch 632
    kernels against 1,146 for the torch merge (``wavg``) on the same matcher, so the saving is the
    merge's, not the matcher's."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from count_ops import count_training_step, launching, training_models

    counts = {name: count_training_step(model) for name, model in training_models(PYRA_ROWS).items()}
    torch_merge, kernels = (launching(counts[name]) for name in PYRA_ROWS)
    # the matcher's two kernels per layer in both rows, and the backward's two
    assert counts[PYRA_ROWS[1]]["merge_wavg"] == 12 and counts[PYRA_ROWS[1]]["triton_launch"] == 24 + 24
    assert counts[PYRA_ROWS[0]]["triton_launch"] == 24
    assert kernels <= 632 and torch_merge - kernels >= 12 * 40, (kernels, torch_merge)


PYRA_ROWS = ("pyra/high+match-kernels", "pyra/high+merge-kernels")
