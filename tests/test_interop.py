"""import_reference: checkpoints in the reference implementation's train.py format."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from helpers import TINY, randomize_, tiny_vit

from pyra_lightning import apply_lora, apply_merging, fold_lora, import_reference

SCHEDULE = [6, 5, 4, 3]


def to_reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our keys to the reference's, spelled out key by key as its model defines them."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.endswith("attn.qkv.lora_a"):
            key = ".".join(parts[:2] + ["attn", "LoRA_a", "weight"])
        elif key.endswith("attn.qkv.lora_b"):
            key = ".".join(parts[:2] + ["attn", "LoRA_b", "weight"])
        elif key.endswith("pyra.weight_r"):
            key = ".".join(parts[:2] + ["pyra_a"])
        elif key.endswith("pyra.weight_d"):
            key = ".".join(parts[:2] + ["pyra_b"])
        elif ".pyra.norm." in key:
            key = ".".join(parts[:2] + ["pyra_norm", parts[-1]])
        out[key] = value
    return out


def reference_checkpoint(tmp_path: Path, name: str, pyra: bool = True) -> tuple[Path, torch.nn.Module]:
    model = randomize_(apply_merging(apply_lora(tiny_vit(name), 4), SCHEDULE, pyra=pyra)).eval()
    state = to_reference_keys(model.state_dict())
    assert "blocks.0.attn.LoRA_a.weight" in state
    assert not pyra or state["blocks.0.pyra_a"].shape == (6, 1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 99, "args": argparse.Namespace(lr=1e-3, pyra=pyra)}, path)
    return path, model


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("pyra", [True, False])
def test_import_matches_the_original_before_and_after_folding(tmp_path, name, pyra) -> None:
    path, original = reference_checkpoint(tmp_path, name, pyra)
    x = torch.randn(2, 3, 32, 32)
    imported = import_reference(path, name, SCHEDULE, pyra=pyra, model_kwargs=TINY)
    assert not imported.training
    with torch.no_grad():
        expected = original(x)
        assert (imported(x) - expected).abs().max() <= 1e-4
        fold_lora(imported)
        assert (imported(x) - expected).abs().max() <= 1e-4


def test_reference_names_map_to_timm_architectures(tmp_path) -> None:
    path, _ = reference_checkpoint(tmp_path, "vit_tiny_patch16_224")
    with pytest.raises(
        ValueError,
        match=r"does not fit vit_small_patch16_224_in21k \(timm vit_small_patch16_224\).*misshaped",
    ):
        import_reference(path, "vit_small_patch16_224_in21k", 2, pyra=False)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path) -> None:
    path, _ = reference_checkpoint(tmp_path, "vit_tiny_patch16_224")
    blob = torch.load(path, weights_only=False)
    del blob["model"]["blocks.2.pyra_norm.bias"]
    blob["model"]["blocks.0.extra"] = torch.zeros(1)
    torch.save(blob, path)
    with pytest.raises(ValueError) as error:
        import_reference(path, "vit_tiny_patch16_224", SCHEDULE, model_kwargs=TINY)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: blocks.2.pyra.norm.bias" in message
    assert "unexpected keys: blocks.0.extra" in message
    with pytest.raises(
        ValueError, match=r"misshaped: blocks.0.pyra.weight_r: checkpoint \(6, 1\) vs model \(5, 1\)"
    ):
        import_reference(
            reference_checkpoint(tmp_path, "vit_tiny_patch16_224")[0],
            "vit_tiny_patch16_224",
            [5, 5, 4, 3],
            model_kwargs=TINY,
        )


def test_missing_file_and_non_checkpoints_are_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        import_reference(tmp_path / "nope.pth", "vit_tiny_patch16_224", SCHEDULE)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth: cannot be read as a reference checkpoint"):
        import_reference(bad, "vit_tiny_patch16_224", SCHEDULE)
    with pytest.raises(ValueError, match="missing key 'head.weight'"):
        import_reference(
            {"model": {"blocks.0.attn.LoRA_a.weight": torch.zeros(4, 48)}}, "vit_tiny_patch16_224", 2
        )


GOLDEN = Path(__file__).parent / "data" / "reference"
REFERENCE_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}


@pytest.mark.parametrize(
    ("name", "model_name", "schedule", "pyra"),
    [
        ("vit", "vit_tiny_patch16_224", [3, 2, 2, 1], True),
        ("deit", "deit_tiny_distilled_patch16_224", [3, 2, 2, 1], True),
        ("deit_nopyra", "deit_tiny_distilled_patch16_224", [3, 2, 2, 1], False),
        ("vit_onelayer", "vit_tiny_patch16_224", [0, 4, 0, 0], True),
    ],
)
def test_matches_outputs_of_the_reference_code(
    name: str, model_name: str, schedule: list[int], pyra: bool
) -> None:
    golden = torch.load(GOLDEN / f"ref_tiny_{name}_io.pt", weights_only=False)
    model = import_reference(
        GOLDEN / f"ref_tiny_{name}.pth", model_name, schedule, pyra=pyra, model_kwargs=REFERENCE_TINY
    )
    apply_merging(model, schedule, pyra=pyra, trace_source=True)  # keeps the loaded PYRA layers
    with torch.no_grad():
        assert (model(golden["x"]) - golden["logits"]).abs().max() <= 1e-4
        _, state = model.forward_tokens(golden["x"])
        assert torch.equal(state.size, golden["final_size"].to(state.size.dtype))
        assert torch.equal(state.source, golden["source"].to(state.source.dtype))
        fold_lora(model)
        assert (model(golden["x"]) - golden["logits"]).abs().max() <= 1e-4
