"""Every registered row honours its seam's contract (CONTRIBUTING.md, sections 2 and 3).

The tests are parametrized over the registries themselves, so a matcher, merger or PEFT method
registered in the package is checked here without a line of test code of its own.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyra_lightning.merge_rules import MATCHERS, MERGERS
from pyra_lightning.peft import PEFT_METHODS

B, N, C = 2, 13, 8  # (B, N, C) tokens: an odd count, so the alternating split is uneven


def tokens(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=generator)  # (B, N, C)


@pytest.mark.parametrize("name", sorted(MATCHERS))
@pytest.mark.parametrize(("num_prefix", "merge_r"), [(0, 1), (1, 3), (2, 5)])
@pytest.mark.parametrize("mode", ["sum", "mean", "amax"])
def test_every_matcher_merges_merge_r_tokens_and_keeps_prefix_tokens_first(
    name: str, num_prefix: int, merge_r: int, mode: str
) -> None:
    x = tokens()
    merge, unmerge = MATCHERS[name]()(x, merge_r, num_prefix)
    merged = merge(x, mode=mode)
    assert merged.shape == (B, N - merge_r, C)
    torch.testing.assert_close(merged[:, :num_prefix], x[:, :num_prefix], rtol=0, atol=0)
    assert unmerge(merged).shape == (B, N, C)


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_every_matcher_conserves_the_patches_a_sum_counts(name: str) -> None:
    x = tokens()
    merge, _ = MATCHERS[name]()(x, 4, 1)
    sizes = merge(torch.ones(B, N, 1), mode="sum")  # (B, N - 4, 1)
    assert sizes.sum(dim=1).flatten().tolist() == [float(N)] * B
    assert sizes.min().item() >= 1.0


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_every_matcher_hands_pyra_the_sources_it_merges(name: str) -> None:
    """``modulate(src, dst)`` reshapes the sources; zeroing them leaves each destination as it was."""
    x = tokens()
    merge, _ = MATCHERS[name]()(x, 3, 1)
    kept = merge(x, mode="sum", modulate=lambda src, dst: torch.zeros_like(src))
    plain = merge(x, mode="sum")
    identity = merge(x, mode="sum", modulate=lambda src, dst: src)
    torch.testing.assert_close(identity, plain)
    assert not torch.allclose(kept, plain)  # three sources left the sums
    # Every row of the zeroed merge is one of the input tokens: no source was added anywhere.
    distance = torch.cdist(kept, x).amin(dim=-1)  # (B, N - 3)
    assert distance.max().item() < 1e-5


@pytest.mark.parametrize("matcher", sorted(MATCHERS))
@pytest.mark.parametrize("merger", sorted(MERGERS))
def test_every_merger_averages_by_size_and_conserves_sizes(matcher: str, merger: str) -> None:
    x = tokens()
    merge, _ = MATCHERS[matcher]()(x, 4, 1)
    size = torch.randint(1, 4, (B, N, 1)).to(x.dtype)  # (B, N, 1)
    merged, new_size = MERGERS[merger]()(merge, x, size)
    assert merged.shape == (B, N - 4, C)
    assert new_size.shape == (B, N - 4, 1)
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close(merged[:, :1], x[:, :1])  # the class token is its own average
    # A size-weighted average is a sum of x * size divided by the summed size.
    torch.testing.assert_close(merged * new_size, merge(x * size, mode="sum"), rtol=1e-5, atol=1e-5)
    constant = torch.full_like(x, 0.5)
    torch.testing.assert_close(MERGERS[merger]()(merge, constant, size)[0], constant[:, : N - 4])


@pytest.mark.parametrize("name", sorted(PEFT_METHODS))
def test_every_peft_method_starts_as_the_linear_and_folds_into_a_plain_linear(name: str) -> None:
    method = PEFT_METHODS[name]
    torch.manual_seed(0)
    linear = nn.Linear(C, 3 * C)
    x = tokens()
    layer = method.layer.from_linear(linear, 4, 8.0)
    assert isinstance(layer, nn.Linear)
    assert layer.weight is linear.weight  # wraps the frozen projection, does not copy it
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x))

    trainable = [n for n, p in layer.named_parameters() if n not in ("weight", "bias")]
    assert trainable, f"{name} registers no tensors of its own"
    assert all(n.startswith(method.prefix) for n in trainable), trainable
    with torch.no_grad():
        for n, param in layer.named_parameters():
            if n in trainable:
                param.add_(torch.randn_like(param) * 0.3)
        adapted = layer(x)
        assert not torch.allclose(adapted, linear(x))
        torch.testing.assert_close(layer.forward_with_bias(x, layer.bias), adapted)

        folded = layer.to_linear()
        assert type(folded) is nn.Linear
        torch.testing.assert_close(folded(x), adapted, rtol=1e-5, atol=1e-5)


def test_report_measure_choices_are_timings_own() -> None:
    """report spells out timing's Literals (so it starts without torch); they must stay equal."""
    import typing

    from pyra_lightning.commands.report import report
    from pyra_lightning.timing import ClockName, Precision

    hints = typing.get_type_hints(report)
    assert typing.get_args(hints["measure_clock"]) == typing.get_args(ClockName)
    assert typing.get_args(hints["measure_precision"]) == typing.get_args(Precision)
