"""PyraClassifier: backbone loading, optimisation recipe, folding for test, small checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import with_settings
from safetensors.torch import save_file

from pyra_lightning.backbone import create_backbone
from pyra_lightning.training.module import PyraClassifier

TINY_KW = {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}


def tiny_module(**kwargs) -> PyraClassifier:
    defaults = dict(
        model_name="vit_tiny_patch16_224",
        num_classes=5,
        img_size=32,
        model_kwargs=TINY_KW,
        merging={"merge_r": [8, 4]},
    )
    return PyraClassifier(**with_settings(defaults, kwargs))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_local_weight_files_load_through_timm(tmp_path, suffix: str) -> None:
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=1000, img_size=32, **TINY_KW
    )
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = create_backbone(
        "vit_tiny_patch16_224", 5, pretrained_file=str(path), img_size=32, model_kwargs=TINY_KW
    )
    assert torch.equal(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert model.head.weight.shape == (5, 48)  # a fresh head for the task


def test_missing_and_mismatched_weight_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_file '.*nope.npz' does not exist"):
        create_backbone("vit_tiny_patch16_224", 5, pretrained_file=str(tmp_path / "nope.npz"))
    other = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, **{**TINY_KW, "embed_dim": 96}
    )
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(
        ValueError, match=r"pretrained weights from file '.*other.pth' do not fit 'vit_tiny_patch16_224'"
    ):
        create_backbone(
            "vit_tiny_patch16_224", 5, pretrained_file=str(path), img_size=32, model_kwargs=TINY_KW
        )
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'"):
        create_backbone("vit_nonexistent", 5)


def test_only_lora_pyra_and_head_train_and_method_names() -> None:
    module = tiny_module()
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".pyra." in n or n.startswith("head.") for n in trainable)
    assert module.method == "pyra"
    assert tiny_module(merging={"pyra": False}).method == "tome"
    assert tiny_module(merging={"merge_r": None}).method == "peft"
    assert tiny_module(merging={"pyra": "gated"}).method == "gated"
    assert tiny_module(merging={"merge_r": "4,-1"}).hparams["merging"]["merge_r"] == "4,-1"


def test_optimizer_groups_decay_and_pyra_lr() -> None:
    module = tiny_module(
        optim={
            "pyra_lr": 0.0001,
            "lr": 0.001,
            "weight_decay": 0.0001,
            "warmup_epochs": 2,
            "warmup_lr": 1e-06,
            "min_lr": 1e-05,
        }
    )
    config = module.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert set(groups) == {"main", "main_no_decay", "pyra", "pyra_no_decay"}
    assert groups["pyra"]["weight_decay"] == 1e-4 and groups["pyra_no_decay"]["weight_decay"] == 0.0
    assert groups["main_no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["main_no_decay"]["params"] + groups["pyra_no_decay"]["params"]}
    for name, param in module.model.named_parameters():
        if param.requires_grad and (param.ndim == 1 or name.endswith(".bias")):
            assert id(param) in no_decay, name
    scheduler = config["lr_scheduler"]["scheduler"]
    # Warm-up starts at warmup_lr; after it every group runs at its own base rate, then decays.
    assert groups["main"]["lr"] == pytest.approx(1e-6)
    scheduler.step(epoch=2)
    # (timm, as the reference: the cosine spans all epochs, so it has already decayed a little.)
    assert groups["main"]["lr"] == pytest.approx(1e-3, rel=2e-3) and groups["pyra"]["lr"] == pytest.approx(
        1e-4, rel=2e-3
    )
    scheduler.step(epoch=99)
    assert 1e-5 <= groups["main"]["lr"] < 2e-5


def test_folded_copy_predicts_the_same_and_leaves_training_intact() -> None:
    module = tiny_module().eval()
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if ".lora_b" in name or ".pyra." in name:
                param.normal_(std=0.1)
        x = torch.randn(8, 3, 32, 32)
        expected = module(x)
        module.inference_model = module.folded_copy()
        folded = module(x)
    assert (folded - expected).abs().max() <= 1e-5
    assert torch.equal(folded.argmax(-1), expected.argmax(-1))
    assert any(".lora_a" in n for n, _ in module.model.named_parameters()), "training model keeps LoRA"


def test_checkpoint_holds_only_trainable_state_and_checks_the_backbone() -> None:
    torch.manual_seed(0)
    module = tiny_module()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert len(checkpoint["backbone_fingerprint"]) == 16
    torch.manual_seed(0)
    tiny_module().on_load_checkpoint(checkpoint)  # same frozen weights: accepted
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="trained on a different frozen backbone"):
        tiny_module().on_load_checkpoint(checkpoint)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"missing \['model.blocks.0.pyra.weight_r'"):
        tiny_module(merging={"merge_r": [7, 4]}).on_load_checkpoint(
            {
                "state_dict": {
                    k: v for k, v in checkpoint["state_dict"].items() if "blocks.0.pyra.weight_r" not in k
                },
                "backbone_fingerprint": checkpoint["backbone_fingerprint"],
            }
        )


def test_hyperparameters_hold_the_setting_groups_as_plain_dicts() -> None:
    """What hparams.yaml, the loggers (``hparams_initial``) and checkpoints get: plain data that
    ``yaml.safe_load`` reads back, one dict per group, and a module rebuilt from it is the same."""
    import yaml

    module = tiny_module(lora={"rank": 3}, merging={"merge_r": [4, 2], "pyra": False})
    for hparams in (module.hparams, module.hparams_initial):
        assert hparams["lora"] == {"rank": 3, "alpha": None, "dropout": 0.1, "method": "lora"}
        assert hparams["merging"]["merge_r"] == [4, 2] and hparams["merging"]["pyra"] is False
        assert yaml.safe_load(yaml.safe_dump(dict(hparams))) == dict(hparams)
    rebuilt = PyraClassifier(**dict(module.hparams))
    assert rebuilt.lora == module.lora and rebuilt.merging == module.merging


def test_compile_model_compiles_the_backbone_once_in_place_with_the_eager_numbers() -> None:
    """``model.compile_model: true``: Lightning's ``configure_model`` compiles the backbone in place
    (checkpoint keys unchanged, a second call does nothing), a training forward and backward give
    the eager loss and gradients, deep copies (the folded inference model) are eager, and an
    elastic run is refused."""
    import copy

    import torch.nn.functional as F
    from helpers import randomize_, tiny_module

    one_block = {"model_kwargs": {"patch_size": 4, "embed_dim": 48, "depth": 1, "num_heads": 3}}
    one_block["merging"] = {"merge_r": [8]}  # one block keeps the compile short
    modules = {False: tiny_module(**one_block), True: tiny_module(compile_model=True, **one_block)}
    torch._dynamo.reset()
    modules[True].configure_model()
    compiled = modules[True].model.__dict__.get("_compiled_call_impl")
    modules[True].configure_model()
    assert compiled is not None and modules[True].model.__dict__.get("_compiled_call_impl") is compiled
    assert modules[False].model.__dict__.get("_compiled_call_impl") is None
    assert modules[True].state_dict().keys() == modules[False].state_dict().keys()
    assert copy.deepcopy(modules[True].model).__dict__.get("_compiled_call_impl") is None
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    torch._dynamo.utils.counters.clear()
    results = {}
    for key, module in modules.items():
        randomize_(module.model)  # LoRA B and PYRA's W_D start at zero
        loss = F.cross_entropy(module.model.train()(x), y)
        loss.backward()
        grads = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
        results[key] = (loss.detach(), grads)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "dynamo compiled a graph"
    assert not torch._dynamo.utils.counters["graph_break"], "one graph, no eager fallback inside"
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys() and any(
        ".pyra." in n for n in results[False][1]
    )
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="model.compile_model with model.merging.elastic: every schedule"):
        tiny_module(compile_model=True, merging={"merge_r": "low", "elastic": {}})
