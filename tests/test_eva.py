"""Today's backbones: timm's Eva family (EVA-02, DINOv3, PE, RoPE ViTs) and SigLIP's attention pooling.

The checks every backbone passes are in ``test_families.py``; these concern rotary embeddings,
Eva's pooling, its LoRA projections and refusals, and its FLOPs model.

Every test builds tiny random-weight models of the real timm architectures, so the same code
paths run as for the pretrained ones (rotary embeddings, SwiGLU, layer scale, registers, GQA).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat

from pyra_lightning import apply_lora, apply_merging, count_flops, count_parameters, mark_trainable
from pyra_lightning.patch import TokenState, merge_schedule, model_shape
from pyra_lightning.schedules import flops_fraction, resolve_schedule

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
SCHEDULE = [8, 6, 4, 2]
# family -> (timm architecture, overrides of TINY). Prefix tokens: class token + registers.
FAMILIES: dict[str, tuple[str, dict]] = {
    "eva02": ("eva02_base_patch14_224", {}),  # separate q/k/v, SwiGLU with scale norm, rope "cat"
    "eva02_fused": ("eva02_base_patch14_224", {"qkv_fused": True}),  # fused qkv + q_bias/v_bias
    "dinov3": ("vit_base_patch16_dinov3_qkvb", {}),  # rope "dinov3", 4 storage tokens, layer scale
    "pe_core": (  # AttentionRope, grouped-query attention, attention pooling, pre-norm
        "vit_pe_core_base_patch16_224",
        {"embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "qkv_fused": False},
    ),
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", {}),  # per-layer learned frequencies
    "siglip": ("vit_base_patch16_siglip_224", {}),  # VisionTransformer with attention pooling
}
NUM_PREFIX = {"eva02": 1, "eva02_fused": 1, "dinov3": 5, "pe_core": 1, "rope_mixed": 1, "siglip": 0}


def tiny(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    name, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **overrides, **kwargs})
    torch.nn.init.normal_(model.get_classifier().weight, std=0.2)
    return model


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_rotary_merge_rule_on_a_hand_built_case() -> None:
    """Two merged tokens: the logit with averaged (sin, cos) is the mean over member pairs."""
    generator = torch.Generator().manual_seed(0)
    head_dim = 8
    angles = torch.rand(5, head_dim // 2, generator=generator) * 6.0  # 5 positions
    sin, cos = angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)
    emb = torch.cat([sin, cos], dim=-1)  # (5, 2 * head_dim), timm's interleaved layout
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    members_i, members_j = [0, 3], [1, 2, 4]
    merged_i, merged_j = emb[members_i].mean(0), emb[members_j].mean(0)
    logit = apply_rot_embed_cat(q, merged_i) @ apply_rot_embed_cat(k, merged_j)
    pairs = [
        apply_rot_embed_cat(q, emb[a]) @ apply_rot_embed_cat(k, emb[b]) for a in members_i for b in members_j
    ]
    torch.testing.assert_close(logit, torch.stack(pairs).mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["eva02", "dinov3", "rope_mixed"])
def test_each_layer_gets_the_size_weighted_mean_of_its_members_embeddings(family: str, x) -> None:
    model = apply_merging(tiny(family), SCHEDULE, trace_source=True).eval()
    seen: list[tuple[TokenState, torch.Tensor]] = []
    hooks = [
        block.register_forward_pre_hook(lambda _, args: seen.append((args[1], args[2])))
        for block in model.blocks
    ]
    with torch.no_grad():
        model(x)
        embed = model.rope.get_embed(shape=model.patch_embed.grid_size)  # (Np, R); mixed: (depth, H, Np, R)
    for hook in hooks:
        hook.remove()
    npt = model.num_prefix_tokens
    for layer, (state, rope) in enumerate(seen[1:], start=1):
        layer_embed = embed[layer] if model.rope_mixed else embed
        members = state.source[:, npt:, npt:]  # (B, n, Np)
        expected = (members.unsqueeze(1) @ layer_embed) / members.sum(-1, keepdim=True).unsqueeze(1)
        assert rope.shape[-2] == members.shape[1] < 64
        torch.testing.assert_close(rope.expand_as(expected), expected, rtol=1e-5, atol=1e-6)


def test_rope_coordinate_augmentation_and_patch_dropout_keep_working(x) -> None:
    kwargs = dict(
        rope_shift_coords=0.5, rope_jitter_coords=1.2, rope_rescale_coords=1.5, patch_drop_rate=0.25
    )
    for family in ("dinov3", "rope_mixed"):
        model = apply_merging(apply_lora(tiny(family, **kwargs), 4), [4, 4, 2, 2])
        mark_trainable(model)
        model.train()
        torch.manual_seed(0)
        first = model(x)
        first.sum().backward()
        second = model(x)
        assert not torch.allclose(first, second), "train-time augmentation draws differ per step"
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_proportional_attention_pool_counts_a_merged_token_as_its_members() -> None:
    pool = tiny("siglip").attn_pool.eval()
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 1, 48, generator=generator).unbind(0)
    duplicated = torch.cat([a, a, a, b], dim=1)  # (1, 4, 48): three identical tokens
    merged = torch.cat([a, b], dim=1)
    size = torch.tensor([[[3.0], [1.0]]])
    for fused in (True, False):
        pool.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(
                pool(merged, attn_mask=size.log().view(1, 1, 1, 2)), pool(duplicated), rtol=1e-5, atol=1e-6
            )


def test_avg_pool_is_size_weighted_and_token_pool_reads_the_class_token(x) -> None:
    model = apply_merging(tiny("eva02"), SCHEDULE).eval()  # EVA-02 pools by average
    assert model.global_pool == "avg"
    with torch.no_grad():
        tokens, state = model.forward_tokens(x)
        patches, size = tokens[:, 1:], state.size[:, 1:]
        expected = model.head(model.fc_norm((patches * size).sum(1) / size.sum(1)))
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("family", "expected_per_block"),
    [
        ("eva02", 4 * (3 * 48 + 3 * 48)),  # separate q/k/v: rank (3D + A + 2K)
        ("eva02_fused", 4 * (48 + 3 * 48)),  # fused: rank (D + 3A)
        ("pe_core", 4 * (3 * 64 + 64 + 2 * 32)),  # grouped-query: K = 2 kv heads x 16
    ],
)
def test_lora_parameter_groups_per_projection_form(family: str, expected_per_block: int) -> None:
    model = apply_lora(tiny(family), 4)
    counts = count_parameters(model)
    assert counts.lora == 4 * expected_per_block == counts.trainable
    keys = model.state_dict().keys()
    attn = model.blocks[0].attn
    for target in ("qkv",) if attn.qkv is not None else ("q_proj", "k_proj", "v_proj"):
        assert {f"blocks.0.attn.{target}.{p}" for p in ("weight", "lora_a", "lora_b")} <= keys
    if family == "eva02_fused":
        assert "blocks.0.attn.q_bias" in keys and "blocks.0.attn.v_bias" in keys


def test_eva_refusals_name_the_model_and_the_reason() -> None:
    model = tiny("eva02")
    model.blocks[2] = torch.nn.Identity()
    with pytest.raises(
        ValueError, match=r"Eva \(eva02_base_patch14_224\): blocks\[2\] is Identity, expected"
    ):
        apply_merging(model, 2)
    model = tiny("eva02")
    model.blocks[0].attn.num_prefix_tokens = 0
    with pytest.raises(ValueError, match=r"skips rotation for 0 prefix tokens but the model has 1"):
        apply_lora(model, 4)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("eva02_base_patch14_224", {}),
        ("vit_base_patch16_dinov3", {}),
        ("vit_pe_core_base_patch16_224", {}),
        ("vit_base_patch14_reg4_dinov2", {"img_size": 518}),
        ("vit_base_patch16_siglip_224", {"img_size": 384}),
        ("vit_base_patch16_siglip_512", {}),
        ("eva02_base_patch14_448", {}),
        ("vit_small_patch16_rope_mixed_224", {}),
    ],
)
def test_low_and_high_mean_the_papers_flops_fractions_everywhere(name: str, kwargs: dict) -> None:
    with torch.device("meta"):
        shape = model_shape(timm.create_model(name, pretrained=False, **kwargs))
    low, high = resolve_schedule("low", shape), resolve_schedule("high", shape)
    assert 0.48 < flops_fraction(low, shape) <= 0.500
    assert 0.27 < flops_fraction(high, shape) <= 0.289


def test_flops_model_matches_the_flop_counter_for_swiglu_gqa_and_attention_pooling() -> None:
    for family in ("eva02", "pe_core", "siglip"):
        model = tiny(family).requires_grad_(False)  # frozen, as in training
        set_fused(model, False)  # explicit attention: its matmuls are counted on CPU
        shape = model_shape(model)
        full = count_flops(model)
        apply_merging(model, SCHEDULE, pyra=False)
        set_fused(model, False)
        merged = count_flops(model)
        assert merged / full == pytest.approx(flops_fraction(SCHEDULE, shape), abs=0.01), family
        assert merge_schedule(model) == SCHEDULE


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_one_epoch_fit_of_the_demo_with_a_tiny_rope_eva(tmp_path: Path) -> None:
    from pyra_lightning.__main__ import main

    runs = tmp_path / "runs"
    main(
        [
            "fit",
            f"--config={CONFIGS / 'quickstart.yaml'}",
            "--model.model_name=vit_base_patch16_dinov3_qkvb",
            '--model.model_kwargs={"patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}',
            "--model.merging.merge_r=[8, 6, 4, 2]",
            "--trainer.max_epochs=1",
            f"--data.root={tmp_path / 'data'}",
            f"--run_dir={runs}",
            "--trainer.enable_progress_bar=false",
            "--throughput.runs=2",
            "--throughput.warmup=1",
        ]
    )
    results = sorted(runs.rglob("results.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert record["method"] == "pyra" and record["config"]["merge_r"] == [8, 6, 4, 2]
    assert record["gflops"] < record["gflops_unmerged"]
    assert sorted(runs.rglob("last.ckpt"))


def test_data_follows_the_backbone_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyra_lightning.data import backbone_config
    from pyra_lightning.data.backbone_config import backbone_data_config
    from pyra_lightning.data.vtab import VTABDataModule

    dm = VTABDataModule(task="demo", backbone="vit_base_patch16_dinov3")  # timm default tag: 256 px
    assert (dm.img_size, dm.normalization) == (256, "imagenet")
    dm = VTABDataModule(task="demo", backbone="eva02_base_patch14_224.mim_in22k", img_size=112)
    assert (dm.img_size, dm.normalization) == (112, "openai_clip")
    dm = VTABDataModule(
        task="demo", backbone="vit_base_patch16_siglip_224.v2_webli", normalization="imagenet"
    )
    assert dm.normalization == "imagenet" and dm.mean == (0.485, 0.456, 0.406)
    assert backbone_data_config("vit_pe_core_base_patch16_224.fb") == (224, "inception")
    plain = VTABDataModule(task="demo")  # no backbone: the previous defaults
    assert (plain.img_size, plain.normalization) == (224, "imagenet")
    cfg = dataclasses.replace(
        timm.models.get_pretrained_cfg("vit_base_patch16_224.orig_in21k"), mean=(0.1, 0.2, 0.3)
    )
    monkeypatch.setattr(backbone_config, "get_pretrained_cfg", lambda name: cfg)
    with pytest.raises(
        ValueError, match=r"declares mean \(0.1, 0.2, 0.3\).*set data.normalization explicitly"
    ):
        backbone_data_config("vit_base_patch16_224.orig_in21k")
