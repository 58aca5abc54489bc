"""Elastic merging (issue 18): one fit over a range of merge rates; its mechanics, one behaviour each."""

from __future__ import annotations

import copy
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import with_settings

from pyra_lightning.modulation import PyraModulation
from pyra_lightning.patch import fold_lora, merge_schedule
from pyra_lightning.schedules import _proportional, draw_fraction, elastic_capacity, flops_fraction
from pyra_lightning.training import elastic
from pyra_lightning.training.module import PyraClassifier

TINY = {"patch_size": 4, "embed_dim": 48, "depth": 6, "num_heads": 3}  # 6 blocks reach 0.289
# family -> (timm architecture, model_kwargs): the table the suite is parametrised over.
FAMILIES: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dinov2_registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "eva02_rope": ("eva02_base_patch14_224", {}),
    "siglip_attn_pool": ("vit_base_patch16_siglip_224", {}),
}


def elastic_module(family: str = "vit", seed: int = 0, **kwargs) -> PyraClassifier:
    name, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    defaults = dict(
        model_name=name,
        num_classes=5,
        img_size=32,
        model_kwargs={**TINY, **overrides},
        drop_path_rate=0.0,
        lora={"rank": 4, "dropout": 0.0},
        merging={"merge_r": "low", "elastic": {}},
    )
    module = PyraClassifier(**with_settings(defaults, kwargs))
    with torch.no_grad():  # start away from the identity, so that a wrong row would show
        for param_name, param in module.model.named_parameters():
            if ".lora_b" in param_name or ".pyra." in param_name:
                param.add_(torch.randn(param.shape) * 0.2)
    return module


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.randint(0, 5, (3,), generator=generator)


def test_step_schedules_are_a_pure_function_of_seed_and_step() -> None:
    plan = elastic_module().elastic_plan
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = [plan.step_schedules(seed=7, step=step, index=0) for step in range(20)]
    assert first == [plan.step_schedules(seed=7, step=step, index=0) for step in range(20)]
    assert torch.equal(torch_state, torch.get_rng_state()) and python_state == random.getstate()
    drawn = {tuple(step[1]) for step in first}
    assert len(drawn) > 5, "the drawn schedule varies from step to step"
    assert [s[1] for s in first] != [plan.step_schedules(seed=8, step=k, index=0)[1] for k in range(20)]
    low, high = plan.bounds
    for fastest, random_one in first:
        assert fastest == plan.fastest  # the sandwich's lower slice, every step
        assert low <= flops_fraction(random_one, plan.shape) <= high
        plan.check(random_one)  # within the per-layer capacity too
    fractions = [draw_fraction(0, step, 0, 0.289, 1.0) for step in range(200)]
    assert 0.289 <= min(fractions) < 0.35 and 0.95 < max(fractions) <= 1.0


def test_include_full_and_no_sandwich_change_what_a_step_runs() -> None:
    full = elastic_module(merging={"elastic": {"include_full": True}}).elastic_plan.step_schedules(0, 0, 0)
    assert len(full) == 3 and full[-1] == [0] * 6
    assert (
        len(elastic_module(merging={"elastic": {"sandwich": False}}).elastic_plan.step_schedules(0, 0, 0))
        == 1
    )


def test_capacity_bounds_every_schedule_of_the_range() -> None:
    plan = elastic_module().elastic_plan
    low, high = plan.bounds
    most = [0] * plan.shape.depth
    for step in range(4001):
        schedule = _proportional(step / 4000, plan.shape)
        if low <= flops_fraction(schedule, plan.shape) <= high:
            most = [max(a, b) for a, b in zip(most, schedule, strict=True)]
    capacity = elastic_capacity(0.289, 1.0, plan.shape)
    assert all(c >= m for c, m in zip(capacity, most, strict=True)), (capacity, most)
    assert sum(capacity) <= sum(most) + plan.shape.depth, "the bound is tight to one pair per layer"
    rows = [b.pyra.merge_r if b.pyra is not None else 0 for b in elastic_module().model.blocks]
    assert rows == list(plan.capacity)


@pytest.mark.parametrize(
    "family", ["vit", "deit_distilled", "dinov2_registers", "eva02_rope", "siglip_attn_pool"]
)
def test_gradients_flow_at_every_drawn_schedule_with_activation_checkpointing(family: str, batch) -> None:
    images, labels = batch
    module = elastic_module(family)
    plan = module.elastic_plan
    model = module.model
    calls = []
    hook = model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # views share hooks
    for step in range(2):
        for schedule in plan.step_schedules(0, step, 0):
            grads = {}
            for checkpointing in (False, True):
                model.set_grad_checkpointing(checkpointing)
                model.zero_grad(set_to_none=True)
                calls.clear()
                with elastic.scheduled(model, schedule):
                    logits = model(images)
                F.cross_entropy(logits, labels).backward()
                assert len(calls) == (2 if checkpointing else 1), "checkpointing recomputed the block"
                grads[checkpointing] = {
                    n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
                }
            assert grads[True].keys() == grads[False].keys()
            for name, grad in grads[True].items():  # each recomputation saw its own schedule
                torch.testing.assert_close(grad, grads[False][name], rtol=1e-4, atol=1e-6)
            assert any(".lora_" in n and g.abs().sum() > 0 for n, g in grads[True].items())
            for index, (block, block_r) in enumerate(zip(model.blocks, schedule, strict=True)):
                weight = block.pyra.weight_r if block.pyra is not None else None
                grad = grads[True].get(f"blocks.{index}.pyra.weight_r")
                if weight is None or block_r == 0:
                    assert grad is None or not grad.any()
                    continue
                if index == len(schedule) - 1:  # the last merge feeds only the per-token MLP: a
                    continue  # class-token readout never sees it, so its W_r may get no gradient
                assert grad[:block_r].abs().sum() > 0, f"block {index} at merge_r={block_r} trains W_r"
                assert not grad[block_r:].any(), "rows beyond this rate's pairs take no gradient"
    hook.remove()
    assert merge_schedule(model) == merge_schedule(elastic_module(family).model), "nominal schedule kept"


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "eva02_rope"])
def test_fraction_one_is_the_unmerged_model_and_each_point_exports_exactly(family: str, batch) -> None:
    images, _ = batch
    module = elastic_module(family)
    plan = module.elastic_plan
    full = module.folded_copy(plan.schedule(1.0))
    assert merge_schedule(full) == [0] * plan.shape.depth
    name, overrides = FAMILIES[family]
    stock = timm.create_model(name, pretrained=False, num_classes=5, img_size=32, **TINY, **overrides).eval()
    stock.load_state_dict(full.state_dict())  # strict: the deployable model at 1.0 has timm's keys
    with torch.no_grad():
        torch.testing.assert_close(full(images), stock(images), rtol=0, atol=0)
        for point in plan.curve_points():
            schedule = plan.schedule(point)
            cut = module.folded_copy(schedule)  # PYRA cut to the schedule's rows
            assert all(
                (b.pyra is None) == (r == 0) and (b.pyra is None or b.pyra.merge_r == r)
                for b, r in zip(cut.blocks, schedule, strict=True)
            )
            live = fold_lora(copy.deepcopy(module.model)).eval()
            with elastic.scheduled(live, schedule):
                expected = live(images)
            torch.testing.assert_close(cut(images), expected, rtol=0, atol=0)


def test_bf16_autocast_runs_every_slice(batch) -> None:
    images, labels = batch
    module = elastic_module()
    for schedule in module.elastic_plan.step_schedules(0, 0, 0):
        with torch.autocast("cpu", dtype=torch.bfloat16), elastic.scheduled(module.model, schedule):
            loss = F.cross_entropy(module.model(images).float(), labels)
        loss.backward()
        assert torch.isfinite(loss)


def test_a_plain_pyra_layer_still_refuses_another_pair_count() -> None:
    layer = PyraModulation(4, 8)
    with pytest.raises(ValueError, match="built for merge_r=4 received 3"):
        layer(torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    elastic_layer = PyraModulation(4, 8, elastic=True)
    assert elastic_layer(torch.randn(1, 3, 8), torch.randn(1, 3, 8)).shape == (1, 3, 8)
    with pytest.raises(ValueError, match="at most that many"):
        elastic_layer(torch.randn(1, 5, 8), torch.randn(1, 5, 8))


def test_bad_ranges_and_schedules_outside_the_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['min_frac'\]"):
        elastic_module(merging={"elastic": {"min_frac": 0.3}})
    with pytest.raises(ValueError, match="0 < min_fraction <= max_fraction <= 1"):
        elastic_module(merging={"elastic": {"min_fraction": 0.8, "max_fraction": 0.5}})
    # The range as deployed starts at its fastest schedule, which the solver rounds below 0.5.
    plan = elastic_module(merging={"elastic": {"min_fraction": 0.5}}).elastic_plan
    lowest = flops_fraction(plan.fastest, plan.shape)
    assert lowest < 0.5 and plan.describe() == f"{lowest:.3f}..1.000 of the uncompressed FLOPs"
    with pytest.raises(
        ValueError, match=rf"outside this elastic model's trained range {lowest:.3f}\.\.1\.000"
    ):
        elastic_module(merging={"merge_r": "high", "elastic": {"min_fraction": 0.5}})
    with pytest.raises(ValueError, match=r"merge_r=0.2: outside this elastic model's trained range"):
        elastic_module(merging={"merge_r": 0.2, "elastic": {"min_fraction": 0.5}})  # not "unreachable"
    with pytest.raises(
        ValueError, match=r"model.merging.elastic.min_fraction=0.289: FLOPs target 0.289 is unreachable"
    ):
        elastic_module(model_kwargs={**TINY, "depth": 2})
    with pytest.raises(ValueError, match="needs merging"):
        PyraClassifier(
            "vit_tiny_patch16_224",
            5,
            img_size=32,
            model_kwargs=TINY,
            merging={"merge_r": None, "elastic": {}},
        )
    plan = elastic_module().elastic_plan
    with pytest.raises(ValueError, match="trained for at most"):
        plan.check([plan.capacity[0] + 1, 0, 0, 0, 0, 0])
