"""The Triton matcher's plan kernel under Triton's CPU interpreter: the order of sources and the
merge plan's gather positions, against the torch matcher and ``BipartiteMerge``'s own plan."""

from __future__ import annotations

import pytest
from test_kernels import run_interpreted

from pyra_lightning.kernels import triton_available

_PLAN_CHECK = """
import torch
from pyra_lightning.kernels.matching import triton_match
from pyra_lightning.merge import BipartiteMerge, match, max_merge_r
torch.manual_seed(0)
cases = 0
for prefix in range(5):
    for tokens in (5, 6, 17, 38, 197):  # none a multiple of 16
        most = max_merge_r(tokens, prefix)
        for merge_r in sorted({1, most}) if most else ():
            metric = torch.randn(3, tokens, 24)
            src, dst, unm, perm, dst_out = triton_match(metric, merge_r, prefix)
            want = match(metric, merge_r, prefix)
            for name, g, w in zip(("src", "dst", "unm"), (src, dst, unm), want):
                assert torch.equal(g, w), (prefix, tokens, merge_r, name)
            built = BipartiteMerge(tokens, prefix, want[2], want[0], want[1])  # assembled by torch
            assert torch.equal(perm, built.perm(True)), (prefix, tokens, merge_r)
            assert torch.equal(dst_out, built.dst_out), (prefix, tokens, merge_r)
            cases += 1
print("cases", cases)
"""

_TIES_CHECK = """
import torch
from pyra_lightning.kernels.matching import plan_columns, triton_plan
torch.manual_seed(0)
for na, prefix in ((99, 1), (99, 0), (9, 3), (150, 0)):
    tokens = 2 * na - 1
    node_max = torch.randint(0, 4, (2, na)).float()  # four values: exact ties everywhere
    node_max[0, 3] = node_max[0, 7] = float("nan")
    if not prefix:  # with prefix tokens only A's prefix rows are -inf (the plan puts them first)
        node_max[1, 5] = float("-inf")
    node_max[:, : (prefix + 1) // 2] = float("-inf")  # A's prefix rows, as the match kernel leaves them
    node_idx = torch.randint(prefix // 2, tokens // 2, (2, na))
    merge_r = (tokens - prefix) // 2
    plan = triton_plan(node_max, node_idx, tokens, merge_r, prefix)
    perm, dst_out, src, dst, unm, _ = plan.split(plan_columns(tokens, merge_r), dim=1)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices  # NaN first
    assert torch.equal(src, order[:, :merge_r]), (na, prefix)
    rest = order[:, merge_r:]
    assert torch.equal(unm, rest.sort(dim=1).values if prefix else rest), (na, prefix)
    assert torch.equal(dst, node_idx.gather(1, src)), (na, prefix)
    for row in perm[:, :tokens]:  # every token lands in exactly one slot: nothing left unwritten
        assert sorted(row.tolist()) == list(range(tokens)), (na, prefix)
print("ties ordered")
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_plan_kernel_builds_the_torch_plan_under_the_interpreter() -> None:
    """0-4 prefix tokens, odd and even token counts, merge_r 1 and at its maximum: the kernels'
    sources, destinations and unmerged tokens are the torch matcher's, and their ``perm`` and
    ``dst_out`` are those ``BipartiteMerge`` assembles from them."""
    assert "cases 44" in run_interpreted(_PLAN_CHECK)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_plan_kernel_orders_ties_and_nan_as_a_stable_descending_sort() -> None:
    """Exact ties of maxima (frequent here, rare on real features), -inf rows and NaN: the ranks
    are ``torch.sort(descending=True, stable=True)``'s (NaN first), so they are a permutation and
    every slot of the plan is written."""
    assert "ties ordered" in run_interpreted(_TIES_CHECK)
