"""Bipartite soft matching and size-weighted merging (eqs. 2-3) as pure functions."""

from __future__ import annotations

import pytest
import torch

from pyra_lightning.merge import bipartite_soft_matching, max_merge_r, merge_source, merge_wavg, weighted_mean


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
