"""Export: the LoRA-folded model as safetensors + config.json, rebuilt without Lightning."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import tiny_module as helpers_tiny_module
from helpers import with_settings
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from pyra_lightning.__main__ import main
from pyra_lightning.commands.export import CONFIG_FILE, WEIGHTS_FILE, export_model, load_exported
from pyra_lightning.commands.export import main as export_main  # raises, where the console script prints
from pyra_lightning.data.vtab import NORMALIZATION_STATS, VTABDataModule
from pyra_lightning.training.module import PyraClassifier

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_module(**overrides: Any) -> PyraClassifier:
    """``helpers.tiny_module`` with the larger learning rate these tests train with."""
    return helpers_tiny_module(**with_settings({"optim": {"lr": 0.05}}, overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> PyraClassifier:
    """A tiny module after a few optimizer steps, so LoRA B and PYRA are no longer zero."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 5, (32,)))
    module = tiny_module()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("fit"),
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if ".lora_b" in n)
    return module


def test_exported_model_predicts_like_the_folded_model_without_lightning(
    trained: PyraClassifier, tmp_path: Path
) -> None:
    out = export_model(trained, tmp_path / "model", mean=MEAN, std=STD)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from pyra_lightning.commands.export import load_exported
        model = load_exported({str(out)!r}).model
        assert not model.training
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "x.pt")!r}))
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not leaked, leaked
        torch.save(logits, {str(tmp_path / "y.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    exported = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        folded = trained.folded_copy()(x)
        trained.eval()
        unfolded = trained(x)  # the training model: LoRA as a separate branch
    assert (exported - folded).abs().max().item() <= 1e-5
    assert torch.equal(exported.argmax(-1), folded.argmax(-1))
    assert torch.allclose(exported, unfolded, atol=1e-4)


def test_config_json_holds_the_recipe_and_writes_are_atomic(trained: PyraClassifier, tmp_path: Path) -> None:
    out = export_model(trained, tmp_path / "model", mean=MEAN, std=STD)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_name"] == "vit_tiny_patch16_224"
    assert config["create_kwargs"] == {
        "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 5, "img_size": 32,
    }  # fmt: skip
    assert config["merge_r"] == [8, 8, 4, 4] and config["pyra"] == "pyra" and config["prop_attn"] is True
    assert config["preprocess"]["img_size"] == 32
    assert config["preprocess"]["mean"] == list(MEAN) and config["preprocess"]["std"] == list(STD)
    weights = load_file(str(out / WEIGHTS_FILE))
    assert not any(".lora_" in name for name in weights), "LoRA must be folded into qkv"
    assert any(".pyra." in name for name in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folders left behind"

    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(trained, out, mean=MEAN, std=STD)
    export_model(trained, out, mean=(0.0, 0.0, 0.0), std=STD, overwrite=True)
    assert json.loads((out / CONFIG_FILE).read_text())["preprocess"]["mean"] == [0.0, 0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_peft_and_tome_models_export_too(tmp_path: Path) -> None:
    for merge_r, pyra in ((None, True), ([4, 4, 4, 4], False)):
        module = tiny_module(merging={"merge_r": merge_r, "pyra": pyra})
        out = export_model(module, tmp_path / f"{merge_r}", mean=MEAN, std=STD)  # verify=True checks it
        config = json.loads((out / CONFIG_FILE).read_text())
        assert config["pyra"] is False and config["merge_r"] == merge_r


def test_module_without_normalization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mean and std"):
        export_model(tiny_module(), tmp_path / "model")


def test_load_exported_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_exported(tmp_path)


def test_load_exported_brings_its_preprocessing(trained: PyraClassifier, tmp_path: Path) -> None:
    """``predict`` on PIL images of any size equals the model on images resized and normalised
    as the data module does it (PIL bicubic straight to img_size, then (x / 255 - mean) / std)."""
    from PIL import Image

    from pyra_lightning import ExportedModel
    from pyra_lightning import load_exported as public_load_exported
    from pyra_lightning.data.datasets import normalize_uint8

    served = public_load_exported(export_model(trained, tmp_path / "model", mean=MEAN, std=STD))
    assert isinstance(served, ExportedModel) and not served.model.training
    generator = torch.Generator().manual_seed(3)
    pictures = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for h, w in ((48, 40), (32, 32), (20, 64))
    ]
    resized = torch.stack(
        [
            torch.from_numpy(np.asarray(p.resize((32, 32), Image.Resampling.BICUBIC)).copy()).permute(2, 0, 1)
            for p in pictures
        ]
    )  # (3, 3, 32, 32) uint8, as data/vtab.py decodes
    by_hand = normalize_uint8(resized, MEAN, STD)
    torch.testing.assert_close(served.preprocess(pictures), by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(served.preprocess(resized), by_hand, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = served.model(by_hand).softmax(-1)
    predictions = served.predict(pictures, top_k=2)
    assert len(predictions) == 3 and all(len(top) == 2 for top in predictions)
    for row, top in zip(expected, predictions, strict=True):
        assert top[0][0] == int(row.argmax()) and top[0][1] == pytest.approx(float(row.max()), abs=1e-5)
        assert top[0][1] >= top[1][1]
    assert served.predict(pictures[0])[0][0][0] == predictions[0][0][0], "one image works too"


# ---------------------------------------------------------------------------- through the CLI
def cli_args(root: Path, *extra: str) -> list[str]:
    return [
        f"--config={QUICKSTART}",
        f"--data.root={root / 'data'}",
        f"--run_dir={root / 'runs'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A short quickstart fit: (its root, its last.ckpt)."""
    root = tmp_path_factory.mktemp("quickstart")
    main(
        [
            "fit",
            *cli_args(root),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
        ]
    )
    (last,) = sorted((root / "runs").rglob("last.ckpt"))
    return root, last


@pytest.mark.slow
def test_cli_export_reproduces_the_tested_accuracy(quickstart_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, last = quickstart_run
    out = tmp_path / "exported"
    main(["export", *cli_args(root), f"--ckpt_path={last}", f"--out_dir={out}"])
    main(
        [
            "test",
            *cli_args(tmp_path / "test", f"--data.root={root / 'data'}"),
            f"--ckpt_path={last}",
            "--throughput.runs=1",
            "--throughput.warmup=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    tested = json.loads(next((tmp_path / "test" / "runs").rglob("results.json")).read_text())["test_acc"]

    # Serve it as a user would: the exported model plus only config.json's preprocessing.
    model = load_exported(out).model
    config = json.loads((out / CONFIG_FILE).read_text())
    data = VTABDataModule(root=str(root / "data"), task="demo", img_size=config["preprocess"]["img_size"])
    data.setup("test")
    mean = torch.tensor(config["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["preprocess"]["std"]).view(1, 3, 1, 1)
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            logits = model((images.float() / 255 - mean) / std)
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    assert total == 400
    assert correct / total == pytest.approx(tested, abs=1e-6)

    # The same export straight from the checkpoint file (seeded like the fit) is the same model.
    again = export_model(last, tmp_path / "again", seed=0)
    assert json.loads((again / CONFIG_FILE).read_text())["preprocess"] == config["preprocess"]
    a, b = load_file(str(out / WEIGHTS_FILE)), load_file(str(again / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_export_from_the_checkpoint_alone_writes_every_format(
    quickstart_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --config: the checkpoint's hyperparameters, normalisation and fingerprint suffice."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install '.[onnx]') is not installed")
    from pyra_lightning.deploy import load_pt2, onnx_session, run_onnx

    root, last = quickstart_run
    out = tmp_path / "alone"
    main(["export", f"--ckpt_path={last}", f"--out_dir={out}", "--format=onnx,pt2"])
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    assert f"exported {last} to {out}: {files}\n" in capsys.readouterr().out, "every file it wrote"
    assert "model.safetensors" in files and "model.onnx" in files
    config = json.loads((out / CONFIG_FILE).read_text())
    # The statistics the run trained with, as its checkpoint records them (the quickstart follows its
    # backbone's timm config).
    trained = torch.load(last, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    assert config["preprocess"]["mean"] == pytest.approx(NORMALIZATION_STATS[trained["normalization"]][0])
    assert set(config["artifacts"]) == {"safetensors", "onnx", "pt2"}
    for fmt in ("onnx", "pt2"):
        assert config["artifacts"][fmt]["max_abs_diff"] <= 1e-4
    served = load_exported(out)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = served.model(x)
        assert (load_pt2(out / "model.pt2")(x) - expected).abs().max() <= 1e-4
    assert (run_onnx(onnx_session(out / "model.onnx", threads=1), x) - expected).abs().max() <= 1e-4
    # The same weights as an export given the fit's arguments.
    with_config = tmp_path / "with_config"
    main(["export", *cli_args(root), f"--ckpt_path={last}", f"--out_dir={with_config}"])
    a, b = load_file(str(out / WEIGHTS_FILE)), load_file(str(with_config / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_export_from_the_checkpoint_alone_refuses_clearly(
    quickstart_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, last = quickstart_run
    with pytest.raises(ValueError, match="pass the fit's --seed"):  # random backbone, other seed
        export_main([f"--ckpt_path={last}", f"--out_dir={tmp_path / 'a'}", "--seed=1"])
    bare = torch.load(last, map_location="cpu", weights_only=True)
    del bare["hyper_parameters"]
    torch.save(bare, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no PyraClassifier hyperparameters.*--config"):
        export_main([f"--ckpt_path={tmp_path / 'bare.ckpt'}", f"--out_dir={tmp_path / 'b'}"])
    with pytest.raises(SystemExit):
        export_main([f"--ckpt_path={last}", f"--out_dir={tmp_path / 'c'}", "--format=tflite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.ckpt"], "a failed export leaves nothing"


def test_cli_export_errors_are_clear(quickstart_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, last = quickstart_run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_main(
            [
                *cli_args(root),
                f"--ckpt_path={tmp_path / 'nope.ckpt'}",
                f"--out_dir={tmp_path / 'a'}",
            ]
        )
    # Arguments that make another model are refused before any tensor is loaded, listing the setting.
    with pytest.raises(ValueError, match="model.backbone_fingerprint: "):  # another random backbone
        export_main(
            [
                *cli_args(root),
                "--seed_everything=1",
                f"--ckpt_path={last}",
                f"--out_dir={tmp_path / 'b'}",
            ]
        )
    with pytest.raises(
        ValueError, match="model.merging.pyra: true in .* vs false now"
    ):  # PYRA trained, not asked
        export_main(
            [
                *cli_args(root),
                "--model.merging.pyra=false",
                f"--ckpt_path={last}",
                f"--out_dir={tmp_path / 'c'}",
            ]
        )
    with pytest.raises(ValueError, match="model.lora.rank: 16 in .* vs 8 now"):  # same names, other shapes
        export_main(
            [
                *cli_args(root),
                "--model.lora.rank=8",
                f"--ckpt_path={last}",
                f"--out_dir={tmp_path / 'd'}",
            ]
        )
    assert not any(tmp_path.iterdir()), "a failed export leaves nothing behind"


def test_every_exported_file_honours_the_umask(tmp_path: Path) -> None:
    # The issue: model.safetensors was 0600 (safetensors' own temporary file) whatever the umask.
    from pyra_lightning.files import plain_dir_mode, plain_file_mode

    previous = os.umask(0o022)
    try:
        out = export_model(tiny_module(), tmp_path / "model", mean=MEAN, std=STD, verify=False)
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
        assert (
            modes
            == {WEIGHTS_FILE: plain_file_mode(), CONFIG_FILE: plain_file_mode()}
            == {
                WEIGHTS_FILE: 0o644,
                CONFIG_FILE: 0o644,
            }
        )
        assert stat.S_IMODE(out.stat().st_mode) == plain_dir_mode() == 0o755
    finally:
        os.umask(previous)
