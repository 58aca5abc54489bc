"""Paper schedules, the FLOPs-target solver, and parameter/FLOPs accounting (Table 1)."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import tiny_vit

from pyra_lightning import apply_lora, apply_merging, count_flops, count_parameters, mark_trainable
from pyra_lightning.patch import merge_schedule, vit_shape
from pyra_lightning.schedules import flops_fraction, resolve_schedule, token_counts


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("vit_base_patch16_224", [16] * 11 + [10], [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]),
        ("deit_base_distilled_patch16_224", [16] * 6 + [10] * 6, [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]),
        (
            "vit_large_patch16_224",
            [8] * 23 + [6],
            [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
        ),
    ],
)
def test_paper_schedules(name: str, low: list[int], high: list[int]) -> None:
    shape = vit_shape(meta_model(name))
    assert resolve_schedule("low", shape) == low
    assert resolve_schedule("high", shape) == high
    # The paper's high schedule ends with few tokens but never merges more than allowed.
    assert token_counts(high, shape)[-1] > shape.num_prefix_tokens


def test_unknown_schedule_name_lists_the_choices() -> None:
    shape = vit_shape(meta_model("vit_base_patch16_224"))
    with pytest.raises(
        ValueError, match=r"unknown schedule name 'medium'; expected one of \['high', 'low'\]"
    ):
        resolve_schedule("medium", shape)


@pytest.mark.parametrize("target", [0.35, 0.5, 0.75, 0.9])
def test_flops_solver_hits_target_as_measured_by_flop_counter(target: float) -> None:
    model = apply_merging(tiny_vit(), target, pyra=False)
    shape = vit_shape(model)
    schedule = merge_schedule(model)
    assert flops_fraction(schedule, shape) <= target
    # The gentlest such schedule: merging one token less somewhere overshoots the target.
    first = next(i for i, r in enumerate(schedule) if r > 0)
    gentler = list(schedule)
    gentler[first] -= 1
    assert flops_fraction(gentler, shape) > target - 0.02
    # The analytic block FLOPs agree with torch.utils.flop_counter on the real model.
    # (The patch embedding and head are outside the blocks, so allow a small difference.)
    full, merged = count_flops(tiny_vit()), count_flops(model)
    assert merged / full == pytest.approx(flops_fraction(schedule, shape), abs=0.03)


def test_paper_high_schedule_on_vit_b_is_about_a_third_of_the_flops() -> None:
    shape = vit_shape(meta_model("vit_base_patch16_224"))
    # PYRA's high rate targets ~3.2x throughput; its FLOPs fraction must be well under 0.4.
    assert 0.2 < flops_fraction(resolve_schedule("high", shape), shape) < 0.4
    assert 0.45 < flops_fraction(resolve_schedule("low", shape), shape) < 0.55  # "50% sparsity"
    solved = resolve_schedule(flops_fraction(resolve_schedule("high", shape), shape), shape)
    assert flops_fraction(solved, shape) <= flops_fraction(resolve_schedule("high", shape), shape)


@pytest.mark.parametrize(
    ("name", "lora_rank", "expected_lora", "pct"),
    [("vit_base_patch16_224", 8, 294_912, 0.34), ("vit_large_patch16_224", 12, 1_179_648, 0.39)],
)
def test_table1_lora_parameter_counts(name: str, lora_rank: int, expected_lora: int, pct: float) -> None:
    model = apply_lora(meta_model(name, num_classes=0), lora_rank)
    counts = count_parameters(model)
    assert counts.lora == expected_lora == counts.trainable
    assert counts.trainable_pct == pytest.approx(pct, abs=0.005)


def test_pyra_parameter_count_is_d_plus_r_per_layer_plus_norm() -> None:
    model = apply_merging(apply_lora(meta_model("vit_base_patch16_224", num_classes=100), 8), "high")
    mark_trainable(model)
    counts = count_parameters(model)
    # Eq. 5 adds D + merge_r per layer (§3.3), the LayerNorm of eq. 4 another 2D.
    assert counts.pyra == sum(768 + r + 2 * 768 for r in merge_schedule(model))
    assert counts.head == 768 * 100 + 100
    assert counts.trainable == counts.lora + counts.pyra + counts.head


def test_count_flops_counts_attention_on_every_backend() -> None:
    # The math backend runs attention as two bmm's, which every torch counts; the default CPU
    # kernel must be counted the same (torch 2.14 counts it as zero without our formula).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_vit()
    with sdpa_kernel(SDPBackend.MATH):
        reference = count_flops(model)
    assert count_flops(model) == reference
    attention = 4 * 4 * 65 * 65 * 48  # 4 blocks x (q kᵀ + attn v) x 2 FLOPs per multiply-add
    model.blocks[0].attn.fused_attn = False  # explicit attention: same count, through matmuls
    assert count_flops(model) == reference > attention


def test_one_spelling_per_setting_merge_r_and_pyra() -> None:
    from pyra_lightning.modulation import method_name, resolve_variant
    from pyra_lightning.schedules import parse_merge_spec

    shape = vit_shape(tiny_vit())
    tome = resolve_schedule((8, -1.0), shape)
    # ToMe's (r, inflection) has one string form for YAML and the command line, with or without brackets.
    assert resolve_schedule("8,-1", shape) == resolve_schedule("(8, -1)", shape) == tome
    assert parse_merge_spec("16,-1") == (16, -1.0) and parse_merge_spec("low") == "low"
    # A two-entry list stays a per-layer list: refused on a 4-block model, with the accepted forms shown.
    with pytest.raises(
        ValueError, match=r"schedule has 2 entries but the model has 4 blocks; merge_r takes .*'16,-1'"
    ):
        resolve_schedule([16, -1], shape)
    with pytest.raises(ValueError, match=r"merge_r='16,x': expected an int"):
        resolve_schedule("16,x", shape)
    assert [resolve_variant(p) for p in (True, False, None, "w_r")] == ["pyra", None, None, "w_r"]
    assert [
        method_name(False, True),
        method_name(True, False),
        method_name(True, True),
        method_name(True, "gated"),
    ] == [
        "peft",
        "tome",
        "pyra",
        "gated",
    ]
    with pytest.raises(ValueError, match="pyra='fancy': expected True, False or a variant name"):
        resolve_variant("fancy")


@pytest.mark.parametrize(
    "name", ["vit_base_patch16_224", "vit_small_patch14_dinov2", "vit_large_patch16_224"]
)
@pytest.mark.parametrize("target", [0.7, 0.5, 0.289])
def test_aligned_flops_schedules_keep_token_counts_at_multiples_of_8(name: str, target: float) -> None:
    """align=8: every block after the first receives a multiple of 8 tokens, prefix included, and
    the FLOPs stay at most the target; the coarser steps cost at most 0.02 of the FLOPs below it."""
    from pyra_lightning.schedules import solve_flops_schedule

    shape = vit_shape(meta_model(name))
    schedule = solve_flops_schedule(target, shape, align=8)
    counts = token_counts(schedule, shape)
    assert all(count % 8 == 0 for count in counts[1:]), counts
    assert target - 0.02 <= flops_fraction(schedule, shape) <= target
    assert solve_flops_schedule(target, shape) != schedule, "alignment changes the schedule"
    assert solve_flops_schedule(target, shape, align=1) == solve_flops_schedule(target, shape)


def test_bad_align_is_a_clear_error() -> None:
    from pyra_lightning.schedules import solve_flops_schedule

    shape = vit_shape(meta_model("vit_base_patch16_224"))
    with pytest.raises(ValueError, match="align must be a positive integer"):
        solve_flops_schedule(0.5, shape, align=0)


def test_count_flops_on_a_stock_attention_pool_model_whose_parameters_require_grad() -> None:
    # The issue: SigLIP's attention pool ("map") failed with "Expected gradient function to be set".
    from pyra_lightning.training.monitoring import training_flops_per_sample

    model = tiny_vit(global_pool="map", class_token=False)
    assert all(p.requires_grad for p in model.parameters())
    flops = count_flops(model)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is given back"
    for p in model.parameters():
        p.requires_grad_(False)
    assert count_flops(model) == flops > 0
    for p in model.parameters():
        p.requires_grad_(True)
    assert training_flops_per_sample(model, 32) > flops, "training counts backward too, with grads on"
