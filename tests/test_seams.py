"""The extension points (CONTRIBUTING.md): a backbone family, a merge rule, a PEFT method and an
export format, each added or swapped through the public interfaces without touching the package."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from helpers import tiny_module
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pyra_lightning import (
    apply_lora,
    apply_merging,
    count_parameters,
    fold_lora,
    mark_trainable,
    register_family,
    register_matcher,
    register_peft_method,
)
from pyra_lightning.deploy import load_exported
from pyra_lightning.dora import DoRALinear
from pyra_lightning.families import FAMILIES
from pyra_lightning.formats import FORMATS
from pyra_lightning.lora import LoRALinear
from pyra_lightning.merge import bipartite_soft_matching, max_merge_r, merge_wavg
from pyra_lightning.merge_reference import bipartite_soft_matching_reference
from pyra_lightning.merge_rules import MATCHERS
from pyra_lightning.patch import merge_rule
from pyra_lightning.patch_vit import FAMILY as VIT
from pyra_lightning.peft import PEFT_METHODS, PeftMethod

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def tiny(name: str = "vit_tiny_patch16_224", seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **kwargs})
    nn.init.normal_(model.get_classifier().weight, std=0.2)  # logits large enough to compare
    return model


def randomize_peft_(model: nn.Module, std: float = 0.2, seed: int = 1) -> nn.Module:
    """Move every PEFT tensor off its identity start (B = 0, magnitude = ||W0||_c)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------- merge reference
@pytest.mark.parametrize("num_prefix", [0, 1, 2, 4])
@pytest.mark.parametrize("which_r", ["one", "half", "max"])
def test_reference_form_agrees_with_the_fast_form(num_prefix: int, which_r: str) -> None:
    num_tokens = 17 + num_prefix
    top = max_merge_r(num_tokens, num_prefix)
    merge_r = {"one": 1, "half": top // 2, "max": top}[which_r]
    generator = torch.Generator().manual_seed(num_prefix * 10 + merge_r)
    metric = torch.randn(3, num_tokens, 8, generator=generator)
    x = torch.randn(3, num_tokens, 6, generator=generator)
    fast, fast_unmerge = bipartite_soft_matching(metric, merge_r, num_prefix)
    ref, ref_unmerge = bipartite_soft_matching_reference(metric, merge_r, num_prefix)
    # Token order: the 0/1 membership of every output token over the inputs is the same, exactly.
    eye = torch.eye(num_tokens)[None].expand(3, -1, -1)
    assert torch.equal(fast(eye, mode="amax"), ref(eye, mode="amax"))
    if num_prefix:
        assert torch.equal(fast(eye, mode="amax")[:, :num_prefix], eye[:, :num_prefix])
    for mode in ("sum", "mean"):
        torch.testing.assert_close(fast(x, mode=mode), ref(x, mode=mode), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        merge_wavg(fast, x, modulate=lambda s, d: s * d.sigmoid())[0],
        merge_wavg(ref, x, modulate=lambda s, d: s * d.sigmoid())[0],
        rtol=0,
        atol=1e-6,
    )
    merged = fast(x)
    assert torch.equal(fast_unmerge(merged), ref_unmerge(merged))


def test_reference_matcher_is_selectable_and_gives_the_same_model(x: torch.Tensor) -> None:
    fast = apply_merging(tiny(), [8, 6, 4, 2])
    ref = apply_merging(tiny(), [8, 6, 4, 2], matcher="bipartite_reference")
    assert merge_rule(ref) == ("bipartite_reference", "wavg")
    with torch.no_grad():
        torch.testing.assert_close(ref(x), fast(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ a toy family, a toy rule
class RenamedViT(VisionTransformer):
    """A ViT subclass that no family knows: it needs one ``register_family`` line."""


class FirstIntoLast:
    """Toy matcher: the first ``merge_r`` mergeable tokens merge into the last token."""

    name = "first_into_last"

    def __call__(self, metric: torch.Tensor, merge_r: int, num_prefix_tokens: int) -> tuple[Any, Any]:
        npt = num_prefix_tokens

        def merge(x: torch.Tensor, mode: str = "mean", modulate: Any = None) -> torch.Tensor:
            src = x[:, npt : npt + merge_r]  # (B, merge_r, C)
            kept = torch.cat([x[:, :npt], x[:, npt + merge_r :]], dim=1)  # (B, N - merge_r, C)
            last = kept[:, -1:]
            if modulate is not None:
                src = modulate(src, last.expand_as(src))
            if mode == "amax":
                combined = torch.maximum(last, src.amax(dim=1, keepdim=True))
            else:
                combined = last + src.sum(dim=1, keepdim=True)
                combined = combined / (merge_r + 1) if mode == "mean" else combined
            return torch.cat([kept[:, :-1], combined], dim=1)

        return merge, None


def test_a_toy_family_and_a_toy_matcher_plug_in_from_outside(
    monkeypatch: pytest.MonkeyPatch, x: torch.Tensor
) -> None:
    checked: list[str] = []

    def check(name: str, model: nn.Module) -> None:
        checked.append(name)
        VIT.check(name, model)

    family = dataclasses.replace(VIT, name="renamed", check=check)
    monkeypatch.setitem(FAMILIES, RenamedViT, family)  # so that the registrations are undone after
    monkeypatch.setitem(MATCHERS, "first_into_last", FirstIntoLast)
    register_family(RenamedViT, family)  # the public lines a contributor writes
    register_matcher("first_into_last", FirstIntoLast)

    torch.manual_seed(0)
    model = RenamedViT(**TINY, global_pool="avg", class_token=True)
    reference = tiny(global_pool="avg")
    reference.load_state_dict(model.state_dict())
    apply_lora(model, lora_rank=2)
    apply_merging(model, [3, 3, 0, 0], pyra=False, matcher="first_into_last")
    assert checked and all(name.startswith("Merging") or name.startswith("RenamedViT") for name in checked)
    assert merge_rule(model) == ("first_into_last", "wavg")
    tokens, state = model.forward_tokens(x)
    assert tokens.shape == (2, 65 - 6, 48)
    expected = torch.ones(2, 59, 1)
    expected[:, -1] = 7  # 1 + 3 after the first block, + 3 after the second
    assert torch.equal(state.size, expected)
    # The merge rule changes what the model computes; without merging it is the stock ViT.
    apply_merging(model, 0, pyra=False, matcher="first_into_last")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_set_merge_rule_swaps_the_kernels_and_keeps_the_trained_pyra_layers() -> None:
    from pyra_lightning import set_merge_rule
    from pyra_lightning.patch import attention_kernel, merge_rule

    model = apply_merging(tiny(), 4)
    layers = [block.pyra for block in model.blocks]
    set_merge_rule(model, matcher="triton", merger="triton", attention="flex")
    assert merge_rule(model) == ("triton", "triton") and attention_kernel(model) == "flex"
    assert [block.pyra for block in model.blocks] == layers
    set_merge_rule(model, merger="wavg")  # None keeps the others
    assert merge_rule(model) == ("triton", "wavg") and attention_kernel(model) == "flex"
    with pytest.raises(ValueError, match="set_merge_rule needs a model patched by apply_merging"):
        set_merge_rule(tiny(), merger="wavg")
    with pytest.raises(ValueError, match="attention='nope' is not registered"):
        set_merge_rule(model, attention="nope")


def test_unknown_rules_and_methods_are_named() -> None:
    with pytest.raises(
        ValueError, match=r"matcher='nope' is not registered; expected one of .*\bbipartite\b"
    ):
        apply_merging(tiny(), 4, matcher="nope")
    with pytest.raises(ValueError, match=r"merger='nope' is not registered; expected one of .*\bwavg\b"):
        apply_merging(tiny(), 4, merger="nope")
    with pytest.raises(ValueError, match=r"attention='nope' is not registered; expected one of .*\bsdpa\b"):
        apply_merging(tiny(), 4, attention="nope")
    with pytest.raises(ValueError, match=r"peft='nope' is not registered; expected one of .*\blora\b"):
        apply_lora(tiny(), 4, method="nope")


# ------------------------------------------------------------------------------------------ DoRA
DORA_MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "eva02": ("eva02_base_patch14_224", {}),  # separate q/k/v
    "eva02_fused": ("eva02_base_patch14_224", {"qkv_fused": True}),  # fused qkv + q_bias/v_bias
}


@pytest.mark.parametrize("family", sorted(DORA_MODELS))
def test_dora_starts_as_the_pretrained_model_and_folds_exactly(family: str, x: torch.Tensor) -> None:
    name, kwargs = DORA_MODELS[family]
    stock = tiny(name, **kwargs)
    model = apply_merging(apply_lora(tiny(name, **kwargs), lora_rank=4, method="dora"), [8, 6, 4, 2])
    layers = [m for m in model.modules() if isinstance(m, DoRALinear)]
    assert layers and all(
        torch.allclose(layer.lora_magnitude, layer.weight.norm(dim=1), atol=1e-6) for layer in layers
    )  # m = ||W0||_c at the start
    with torch.no_grad():
        stock_merged = apply_merging(stock, [8, 6, 4, 2])
        torch.testing.assert_close(model(x), stock_merged(x), rtol=0, atol=1e-5)
        randomize_peft_(model)
        model.eval()
        unfolded = model(x)
        folded = fold_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (unfolded - stock_merged(x)).abs().max() > 1e-2, "DoRA's tensors must change the output"
    torch.testing.assert_close(folded, unfolded, rtol=0, atol=1e-5)


def test_dora_weight_is_magnitude_times_unit_direction() -> None:
    torch.manual_seed(0)
    layer = DoRALinear.from_linear(nn.Linear(6, 5), lora_rank=2, lora_alpha=4.0)
    randomize_peft_(nn.ModuleDict({"qkv": layer}))
    direction = layer.weight + 2.0 * layer.lora_b @ layer.lora_a  # W0 + (alpha / rank) B A
    expected = layer.lora_magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.to_linear().weight, expected, rtol=0, atol=1e-6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, rtol=0, atol=1e-6)


def test_dora_parameter_counts_and_groups() -> None:
    lora = mark_trainable(apply_lora(tiny(), lora_rank=4))
    dora_model = apply_lora(tiny(), lora_rank=4, method="dora")
    dora = mark_trainable(dora_model)
    qkv = dora_model.blocks[0].attn.qkv
    per_block_lora = 4 * (qkv.in_features + qkv.out_features)  # rank (D + 3A)
    assert count_parameters(apply_lora(tiny(), lora_rank=4)).lora == 4 * per_block_lora
    assert count_parameters(dora_model).lora == 4 * (per_block_lora + qkv.out_features)
    assert sorted(dora["lora"]) == sorted(
        [*lora["lora"], *(f"blocks.{i}.attn.qkv.lora_magnitude" for i in range(4))]
    )
    assert all(
        p.requires_grad == (".lora_" in n or n.startswith("head.")) for n, p in dora_model.named_parameters()
    )


class ScaledLinear(nn.Linear):
    """A toy PEFT layer: a trainable per-output scale ``toy_scale``."""

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, lora_rank: int, lora_alpha: Any, lora_dropout: float
    ) -> ScaledLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.toy_scale = nn.Parameter(torch.ones(linear.out_features))
        return layer

    def forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight) * self.toy_scale
        return out if bias is None else out + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_bias(x, self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.toy_scale[:, None])
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def test_parameter_count_counts_what_a_registered_method_registers(
    monkeypatch: pytest.MonkeyPatch, x: torch.Tensor
) -> None:
    monkeypatch.setitem(PEFT_METHODS, "toy", PEFT_METHODS["lora"])  # restored afterwards
    register_peft_method(PeftMethod("toy", ScaledLinear, prefix="toy_", group="lora"))
    model = apply_lora(tiny(), lora_rank=1, method="toy")
    groups = mark_trainable(model)
    assert groups["lora"] == [f"blocks.{i}.attn.qkv.toy_scale" for i in range(4)]
    assert count_parameters(model).lora == 4 * model.blocks[0].attn.qkv.out_features
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("toy_scale"):
                param.uniform_(0.5, 1.5)
        unfolded = model(x)
        torch.testing.assert_close(fold_lora(model)(x), unfolded, rtol=0, atol=1e-5)


def test_what_an_engine_runs_is_folded_for_any_registered_method(
    monkeypatch: pytest.MonkeyPatch, x: torch.Tensor
) -> None:
    """compile_for_inference and the throughput callback time ``prepare_model``'s model: folded,
    so a method that is not LoRA's subclass must not be timed unfolded."""
    from pyra_lightning.inference import prepare_model

    monkeypatch.setitem(PEFT_METHODS, "toy", PEFT_METHODS["lora"])  # restored afterwards
    register_peft_method(PeftMethod("toy", ScaledLinear, prefix="toy_", group="lora"))
    model = apply_lora(tiny(), lora_rank=1, method="toy")
    deployed = prepare_model(model)
    assert not any(isinstance(m, ScaledLinear) for m in deployed.modules())
    assert any(isinstance(m, ScaledLinear) for m in model.modules()), "the trained model is left as it was"
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model.eval()(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ export and module
def test_module_selects_peft_and_matcher_by_name() -> None:
    module = tiny_module(lora={"method": "dora"}, merging={"matcher": "bipartite_reference"})
    assert any(isinstance(m, DoRALinear) for m in module.model.modules())
    assert merge_rule(module.model) == ("bipartite_reference", "wavg")
    assert module.parameter_count().lora == count_parameters(module.model).lora > 0
    with pytest.raises(ValueError, match="peft='adapter' is not registered"):
        tiny_module(lora={"method": "adapter"})


@pytest.mark.parametrize("formats", [("safetensors",), ("safetensors", "onnx", "pt2")])
def test_dora_model_exports_and_records_the_merge_rule(formats: tuple[str, ...], tmp_path: Path) -> None:
    from pyra_lightning.commands.export import export_model

    if "onnx" in formats:
        pytest.importorskip("onnxruntime", reason="the onnx extra (pip install '.[onnx]') is not installed")
    module = tiny_module(
        lora={"method": "dora"},
        merging={"matcher": "bipartite_reference" if len(formats) == 1 else "bipartite"},
    )
    randomize_peft_(module.model)
    out = export_model(module, tmp_path / "model", mean=(0.5,) * 3, std=(0.2,) * 3, formats=formats)
    config = json.loads((out / "config.json").read_text())
    assert config["matcher"] == ("bipartite_reference" if len(formats) == 1 else "bipartite")
    assert config["merger"] == "wavg"
    assert sorted(config["artifacts"]) == sorted(formats)
    loaded = load_exported(out).model
    assert merge_rule(loaded) == (config["matcher"], "wavg")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    module.eval()
    with torch.no_grad():
        unfolded = module(x)
        for name in formats:
            got = FORMATS[name].load(out / FORMATS[name].file, torch.device("cpu"), None)(x)
            torch.testing.assert_close(torch.as_tensor(got), unfolded, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # torch.jit's own
def test_a_format_registered_from_outside_reaches_export_and_benchmark(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TorchScript row (``from_program=False``: it traces the folded model, not the shared
    ``ExportedProgram``) added with ``register_format``: ``export --format`` and its help, and
    ``benchmark --engine``, take it without a change to either command."""
    from pyra_lightning.commands import engines as bench_engines
    from pyra_lightning.commands.export import export_model
    from pyra_lightning.commands.export import main as export_main
    from pyra_lightning.formats import Format, engines, register_format, verify_deployed

    def write(model: Any, path: Path, example: torch.Tensor | None) -> None:
        assert isinstance(model, nn.Module), "from_program=False: the folded model, not a program"
        torch.jit.save(torch.jit.trace(model.cpu(), example.cpu(), check_trace=False), str(path))

    def load(path: Path, device: torch.device, threads: int | None) -> Any:
        return torch.jit.load(str(path), map_location=device)

    monkeypatch.setattr("pyra_lightning.formats.FORMATS", dict(FORMATS))  # the table, restored afterwards
    from pyra_lightning import formats as table

    monkeypatch.setattr("pyra_lightning.commands.export.FORMATS", table.FORMATS)
    register_format(
        Format(
            "torchscript",
            "model.ts",
            lambda: None,
            write,
            load,
            verify_deployed("torchscript"),
            "jit",
            False,
        )
    )
    assert "jit" in engines() and bench_engines.parse_engines("eager,jit") == ["eager", "jit"]
    with pytest.raises(ValueError, match="one of the model engines"):
        register_format(dataclasses.replace(table.FORMATS["torchscript"], name="x", engine="eager"))

    module = tiny_module()
    randomize_peft_(module.model)
    out = export_model(module, tmp_path / "model", mean=(0.5,) * 3, std=(0.2,) * 3, formats=("torchscript",))
    config = json.loads((out / "config.json").read_text())
    assert "torchscript" in config["artifacts"] and (out / "model.ts").is_file()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            load(out / "model.ts", torch.device("cpu"), None)(x), module.eval()(x), rtol=0, atol=1e-4
        )
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "torchscript" in " ".join(capsys.readouterr().out.split()), "--format's help lists the row"
