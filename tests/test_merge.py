"""Bipartite soft matching and size-weighted merging (eqs. 2-3) as pure functions."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyra_lightning import apply_merging
from pyra_lightning.merge import bipartite_soft_matching, max_merge_r, merge_source, merge_wavg, weighted_mean
from pyra_lightning.modulation import PyraModulation


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 4])
def test_prefix_tokens_stay_in_front_and_unmerged(num_prefix: int) -> None:
    torch.manual_seed(0)
    n, tokens, c = 3, 21, 8
    x = torch.randn(n, tokens, c)
    # Make prefix tokens near-duplicates of patches so matching would love to merge them.
    x[:, :num_prefix] = x[:, num_prefix : 2 * num_prefix] + 1e-4
    merge_r = max_merge_r(tokens, num_prefix)
    merge, _ = bipartite_soft_matching(x, merge_r, num_prefix)
    source = merge_source(merge, x)
    assert source.shape == (n, tokens - merge_r, tokens)
    for i in range(num_prefix):
        expected = torch.zeros(tokens)
        expected[i] = 1
        assert torch.equal(source[:, i], expected.expand(n, tokens)), f"prefix token {i} moved or merged"
    assert torch.equal(source.sum(dim=1), torch.ones(n, tokens)), "every input token belongs to one group"


def test_sizes_sum_to_token_count_and_average_is_weighted() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 17, 4)
    size = None
    for merge_r in (8, 4, 2):
        merge, _ = bipartite_soft_matching(x, merge_r, 1)
        merged, size_new = merge_wavg(merge, x, size)
        # Weighted averaging conserves the size-weighted sum of the tokens.
        before = x * (size if size is not None else 1)
        torch.testing.assert_close((merged * size_new).sum(1), before.sum(1), rtol=1e-5, atol=1e-5)
        x, size = merged, size_new
    assert torch.equal(size.sum(dim=1), torch.full((2, 1), 17.0))


def test_unmerge_restores_unmerged_tokens_and_copies_groups() -> None:
    torch.manual_seed(0)
    for num_prefix in (1, 2):
        x = torch.randn(2, 15, 6)
        merge, unmerge = bipartite_soft_matching(x, 4, num_prefix)
        restored = unmerge(merge(x, mode="mean"))
        source = merge_source(merge, x)  # (B, 11, 15)
        # Each input position receives the mean of its group.
        group_mean = (source @ x) / source.sum(-1, keepdim=True)
        expected = source.transpose(1, 2) @ group_mean
        torch.testing.assert_close(restored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge_r", [-1, 9])
def test_merge_r_out_of_range_is_a_clear_error(merge_r: int) -> None:
    with pytest.raises(ValueError, match=r"merge_r=.* out of range .* 0 <= merge_r <= 8"):
        bipartite_soft_matching(torch.randn(1, 17, 4), merge_r, 1)


def test_modulate_sees_size_weighted_pairs() -> None:
    torch.manual_seed(0)
    x, size = torch.randn(1, 9, 3), torch.arange(1.0, 10.0).view(1, 9, 1)
    seen = {}

    def modulate(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        seen["src"], seen["dst"] = src, dst
        return src

    merge, _ = bipartite_soft_matching(x, 2, 1)
    merge_wavg(merge, x, size, modulate=modulate)
    weighted = x * size
    # Every modulated source is some token of set A times its size, every destination one of set B.
    for token in seen["src"][0]:
        assert any(torch.allclose(token, row) for row in weighted[0, ::2])
    for token in seen["dst"][0]:
        assert any(torch.allclose(token, row) for row in weighted[0, 1::2])


def test_weighted_mean_counts_patches_not_tokens() -> None:
    x = torch.tensor([[[1.0], [4.0]]])
    assert weighted_mean(x, torch.tensor([[[3.0], [1.0]]])).item() == pytest.approx(1.75)
    assert weighted_mean(x, None).item() == pytest.approx(2.5)


def test_merge_refuses_tensors_of_another_token_count() -> None:
    merge, _ = bipartite_soft_matching(torch.randn(2, 17, 4), 3, 1)
    with pytest.raises(ValueError, match="merge was matched on 17 tokens but got a tensor of 15"):
        merge(torch.randn(2, 15, 4))


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> int:  # type: ignore[no-untyped-def]
    """Operators of ``fn()`` as issue 17 counts them: under inference_mode, after a warm-up."""
    with torch.inference_mode():
        fn()  # fills the cache of constant index tensors
        counter = _Count()
        with counter:
            fn()
    return counter.calls


@pytest.mark.parametrize(("pyra", "most"), [(False, 22), (True, 32)])
def test_one_merge_issues_few_operators(pyra: bool, most: int) -> None:
    """Matching and the size-weighted merge of one ViT-B/16 layer (197 tokens, merge_r 40): 22
    operators for ToMe and 32 with PYRA (56 and 78 before issue 17), at any batch size."""
    metric, x, size = torch.randn(2, 197, 16), torch.randn(2, 197, 16), torch.rand(2, 197, 1) + 1
    modulate = PyraModulation(40, 16) if pyra else None

    def layer() -> None:
        merge, _ = bipartite_soft_matching(metric, 40, 1)
        merge_wavg(merge, x, size, modulate=modulate)

    assert _count(layer) <= most


@pytest.mark.parametrize(("pyra", "most"), [(False, 476), (True, 596)])
def test_vit_b_forward_operator_count(pyra: bool, most: int) -> None:
    """Eager operators per ViT-B/16 forward at 'high' (counted on the meta device: the count does
    not depend on the machine): 476 ToMe / 596 PYRA, from 899 / 1163; uncompressed 227."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        apply_merging(model, "high", pyra=pyra)
        x = torch.randn(1, 3, 224, 224)
    assert _count(lambda: model.eval()(x)) <= most


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
def test_fused_pyra_equals_the_modulation_module(num_prefix: int) -> None:
    """merge_wavg's PYRA path (eqs. 4-7 on the size-weighted pairs, ``fused_pyra``) computes what
    ``PyraModulation.forward`` computes, values and gradients, with random parameters."""
    from pyra_lightning.merge import _modulate_with_size

    torch.manual_seed(num_prefix)
    pyra = PyraModulation(6, 10)
    with torch.no_grad():
        for param in pyra.parameters():
            param.normal_()
    src, dst = torch.randn(3, 6, 11, requires_grad=True), torch.randn(3, 6, 11)
    fused = _modulate_with_size(pyra, src, dst, 10)
    expected = torch.cat([pyra(src[..., :10], dst[..., :10]), src[..., 10:]], dim=-1)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(fused.square().sum(), [src, *pyra.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [src, *pyra.parameters()])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_weight_views_kept_for_inference_follow_every_change_of_the_weights() -> None:
    """``fused_pyra`` keeps views of ``W_r^T`` and ``W_D^T`` between inference forwards; an optimizer
    step, ``load_state_dict``, a ``.data.copy_`` (how Lightning's weight averaging swaps weights, which
    no version counter sees), a replaced ``.data`` and a deep copy must all be seen at once, and a
    training forward must record them (its gradients reach the weights)."""
    import copy

    from pyra_lightning.merge import _modulate_with_size

    torch.manual_seed(0)
    pyra = PyraModulation(6, 10)
    src, dst = torch.randn(3, 6, 11), torch.randn(3, 6, 11)

    def check(module: PyraModulation = pyra, batch: int = 3) -> None:
        with torch.inference_mode():
            fused = _modulate_with_size(module, src[:batch], dst[:batch], 10)
            expected = torch.cat(
                [module(src[:batch, :, :10], dst[:batch, :, :10]), src[:batch, :, 10:]], dim=-1
            )
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        pyra.weight_r.normal_()
        pyra.weight_d.normal_()
    check()  # keeps the views
    with torch.no_grad():
        pyra.weight_d.mul_(-3.0)  # an optimizer step writes in place
    check()
    pyra.load_state_dict({k: torch.randn_like(v) for k, v in pyra.state_dict().items()})
    check()
    pyra.weight_d.data.copy_(torch.randn_like(pyra.weight_d))  # weight averaging's swap
    check()
    pyra.weight_r.data = torch.randn_like(pyra.weight_r)  # replaced storage
    check()
    check(batch=2)  # another batch size: another expand of W_D^T
    twin = copy.deepcopy(pyra)
    with torch.no_grad():
        twin.weight_d.add_(1.0)
    check(twin)
    check()  # the original is not changed by its copy
    out = _modulate_with_size(pyra, src.requires_grad_(), dst, 10)
    grads = torch.autograd.grad(out.square().sum(), [pyra.weight_r, pyra.weight_d])
    assert all(g.abs().sum() > 0 for g in grads)


def test_constants_cached_under_inference_mode_still_train() -> None:
    """Index tensors cached inside inference_mode are normal tensors: a later training step may
    save them for backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 23, 8, requires_grad=True)
    with torch.inference_mode():
        merge, _ = bipartite_soft_matching(x, 5, 2)
        merge_wavg(merge, x, None)
    merge, _ = bipartite_soft_matching(x, 5, 2)
    merged, size = merge_wavg(merge, x, None, modulate=PyraModulation(5, 8))
    merged.sum().backward()
    assert x.grad is not None and size.is_contiguous()


@pytest.mark.parametrize("pyra", [False, True])
def test_a_cuda_graph_capture_records_the_eager_plan_from_the_warm_cache(
    pyra: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``cudagraph`` engine replays what its capture recorded, so the capture must record the
    eager plan (one gather, in-place accumulate) with the constants its warm-up cached, every one
    a kernel less per replay, not the traced plan meant for exporters; and it must not fill the
    cache: a tensor made during capture holds nothing until a replay. Capture is simulated
    (``merge._capturing`` forced true), since this machine has no GPU."""
    from pyra_lightning import merge as merge_module

    metric, x, size = torch.randn(2, 197, 16), torch.randn(2, 197, 16), torch.rand(2, 197, 1) + 1
    modulate = PyraModulation(40, 16) if pyra else None

    def layer() -> tuple[torch.Tensor, torch.Tensor]:
        merge, _ = bipartite_soft_matching(metric, 40, 1)
        return merge_wavg(merge, x, size, modulate=modulate)

    eager_ops = _count(layer)  # warm: the constants are cached
    with torch.inference_mode():
        want = layer()
    monkeypatch.setattr(merge_module, "_capturing", lambda ref: True)
    assert _count(layer) == eager_ops  # captured as eager runs it, constants from the cache
    with torch.inference_mode():
        torch.testing.assert_close(layer(), want, rtol=0, atol=0)
    merge_module._CACHE.clear()  # a capture that finds the cache cold
    with torch.inference_mode():
        torch.testing.assert_close(layer(), want, rtol=0, atol=0)
    assert merge_module.cached_constants() == []  # built inline, nothing cached while capturing


def test_a_miss_during_a_capture_keeps_the_full_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full cache is cleared on the next miss, except while a CUDA graph is being captured: the
    graph may already read cached constants at their addresses, so they must stay alive. Also
    for a miss on a CPU tensor (a capture is a property of the CUDA stream, not of the tensor).
    Capture is simulated (``torch.cuda`` reports it), since this machine has no GPU."""
    from pyra_lightning import merge as merge_module

    merge_module._CACHE.clear()
    for i in range(merge_module._CACHE_LIMIT):
        merge_module._CACHE[("held by a graph", i)] = torch.zeros(1)
    held = merge_module.cached_constants()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    metric, x = torch.randn(2, 197, 16), torch.randn(2, 197, 16)
    with torch.inference_mode():
        merge, _ = bipartite_soft_matching(metric, 40, 1)
        merge_wavg(merge, x)
    kept = merge_module.cached_constants()
    assert len(kept) == len(held) and all(a is b for a, b in zip(kept, held, strict=True))
    merge_module._CACHE.clear()


@pytest.mark.parametrize("pyra", [False, True])
def test_sizes_stay_out_of_autograd_in_a_training_step(pyra: bool) -> None:
    """Token sizes are patch counts, which no parameter reaches: the reference computes them
    outside autograd. They ride in the gather beside the tokens, so without a ``detach`` every
    later block's ``log(size)`` mask would require grad and SDPA's backward would compute a
    (B, H, N, N) mask gradient for nothing. The parameters still get their gradients."""
    from helpers import randomize_, tiny_vit

    model = tiny_vit()
    apply_merging(model, [8, 8, 4, 4], pyra=pyra)
    randomize_(model)
    model.train()
    seen: list[bool] = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(
                kwargs["size"] is not None and kwargs["size"].requires_grad
            ),
            with_kwargs=True,
        )
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert len(seen) == 4 and not any(seen)
    # (the last block's merge reaches no output: the head reads the class token, never merged)
    params = [p for n, p in model.named_parameters() if "pyra" in n and not n.startswith("blocks.3.")]
    params = params if pyra else [model.blocks[0].attn.qkv.weight]
    assert len(params) == (12 if pyra else 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
