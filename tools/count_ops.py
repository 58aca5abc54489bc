"""Count eager ATen operators per ViT-B/16 forward (random weights, CPU, batch 1), by operator.

    PYTHONPATH=$PWD python tools/count_ops.py [--json out.json] [--train]
    PYTHONPATH=$PWD python tools/count_ops.py --backbone eva02_base_patch14_224 \
        [--timm_kwargs '{"qkv_fused": true}'] [--no_fold]     # forward rows of another backbone

Counted the way issue 17 counts them: a ``TorchDispatchMode`` under ``torch.inference_mode``
(which sees composite operators such as ``linear`` once), after one warm-up forward that fills
``pyra_lightning.merge``'s cache of constant index tensors.

The ``+kernels`` rows (the ``triton`` matcher, merger and attention) count what a CUDA forward dispatches:
on the meta device, with the Triton kernels' launches recorded instead of run (``launches``),
each launch counted as one operator under the name ``triton_launch``.

``--train`` counts one training step instead (LoRA rank 8, PYRA and the head trainable; forward,
cross-entropy and backward, with grad mode on, so composite operators such as ``linear`` are seen
as what they decompose into): the operators an eager training loop's host issues per step. Its
``+merge-kernels`` row is PYRA on the ``triton`` matcher and merger with SDPA attention (the
Triton attention has no backward), its merge's backward being ``kernels.merge_backward`` with
its kernels' launches recorded (``kernels.merge_grad``); ``+channel`` attends with
``attention="sdpa_channel"`` instead (SDPA unmasked, ``log(size)`` in one more key channel).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyra_lightning
from pyra_lightning.peft import apply_lora, mark_trainable


class OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if name == "to" and args and out is args[0]:  # a cast to the dtype it has: no kernel
            name = "to_alias"
        self.ops[name] += 1
        return out


class _Launch:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` records one launch and writes nothing."""

    def __init__(self, ops: collections.Counter[str]) -> None:
        self.ops = ops

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            self.ops["triton_launch"] += 1

        return launch


@contextlib.contextmanager
def launches(ops: collections.Counter[str]) -> Iterator[None]:
    """The Triton rules take their kernel path on any tensor, and every launch is counted in ``ops``."""
    from pyra_lightning.kernels import matching, merge_grad, merging, proportional

    launch = _Launch(ops)
    with contextlib.ExitStack() as stack:
        for module in (matching, merging, merge_grad, proportional):
            stack.enter_context(mock.patch.object(module, "use_triton", lambda *tensors: True))
        stack.enter_context(mock.patch.object(proportional, "attention_kernel", lambda: launch))
        stack.enter_context(mock.patch.object(matching, "match_kernel", lambda: launch))
        stack.enter_context(mock.patch.object(matching, "plan_kernel", lambda: launch))
        stack.enter_context(mock.patch.object(merging, "modulate_kernel", launch))
        stack.enter_context(mock.patch.object(merging, "merge_kernel", launch))
        stack.enter_context(mock.patch.object(merge_grad, "pair_grad_kernel", launch))
        stack.enter_context(mock.patch.object(merge_grad, "place_kernel", launch))
        yield


def _uses_kernels(model: torch.nn.Module) -> bool:
    """Whether a block matches or merges with the ``triton`` rules (then its launches are recorded)."""
    rules = (getattr(b, attr, None) for b in model.blocks for attr in ("matcher", "merger"))
    return any(rule is not None and rule.name == "triton" for rule in rules)


def _images(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """The same seeded (B, 3, H, W) images for every model, at the size its patch embedding (and so
    its merge schedule) was built for (224 for ViT-B/16, 256 for DINOv3), on the model's device."""
    device = next(model.parameters()).device
    height, width = getattr(model.patch_embed, "img_size", None) or (224, 224)
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    return images.to(device)


def count(model: torch.nn.Module, batch: int = 1) -> collections.Counter[str]:
    """Operators of one forward; a model with the ``triton`` rules is counted on the meta device."""
    x = _images(model, batch)
    model.eval()
    counter = OperatorCounter()
    with torch.inference_mode(), launches(counter.ops) if _uses_kernels(model) else contextlib.nullcontext():
        model(x)  # warm-up: builds the cached constants once
        counter.ops.clear()
        with counter:
            model(x)
    return counter.ops


# operators that launch no kernel: views, metadata and allocations; and, as the forward counts see
# them under inference_mode, reshape and flatten of contiguous tokens and eval-mode dropout
NO_KERNEL = frozenset(
    [
        "reshape",
        "flatten",
        "dropout",
        "view",
        "t",
        "transpose",
        "_unsafe_view",
        "expand",
        "permute",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "detach",
        "alias",
        "as_strided",
        "split_with_sizes",
        "unbind",
        "empty",
        "new_empty",
        "to_alias",
    ]
)


def launching(ops: collections.Counter[str]) -> int:
    """How many of ``ops`` launch a kernel. ``merge_wavg`` counts as the two it launches on CUDA:
    a training step calls the merge through its custom operator, which on the meta device runs
    the operator's shape function, not the (recorded) launches."""
    return sum(n for op, n in ops.items() if op not in NO_KERNEL) + ops["merge_wavg"]


def count_training_step(model: torch.nn.Module, batch: int = 1) -> collections.Counter[str]:
    """Operators of one training step (forward, loss, backward) after one warm-up step.

    The gradients are set to ``None`` before each step, as a training loop's
    ``optimizer.zero_grad()`` leaves them (Lightning's default), so the backward assigns each
    parameter's gradient instead of adding it to the last step's (one ``add_`` per parameter)."""
    x = _images(model, batch)
    target = torch.zeros(batch, dtype=torch.long, device=x.device)
    model.train()
    counter = OperatorCounter()
    with launches(counter.ops) if _uses_kernels(model) else contextlib.nullcontext():
        for _ in range(2):  # the first fills the cached constants
            model.zero_grad(set_to_none=True)
            counter.ops.clear()
            with counter:
                torch.nn.functional.cross_entropy(model(x), target).backward()
    return counter.ops


def training_models(names: Iterable[str] | None = None) -> dict[str, torch.nn.Module]:
    """ViT-B/16 with LoRA as ``pyra-lightning fit`` trains it, per variant (``--train``), on the
    meta device; ``names`` picks some."""
    out = {}
    for name, spec, pyra, rule in [
        ("uncompressed", None, False, {}),
        ("tome/high", "high", False, {}),
        ("pyra/high", "high", True, {}),
        ("pyra/high+match-kernels", "high", True, {"matcher": "triton"}),  # the torch merge ("wavg")
        ("pyra/high+merge-kernels", "high", True, {"matcher": "triton", "merger": "triton"}),
        (  # the same, attending unmasked with log(size) in a key channel
            "pyra/high+merge-kernels+channel",
            "high",
            True,
            {"matcher": "triton", "merger": "triton", "attention": "sdpa_channel"},
        ),
    ]:
        if names is not None and name not in names:
            continue
        torch.manual_seed(0)
        with torch.device("meta"):  # every row: the operators SDPA's backward dispatch to are the device's
            model = timm.create_model("vit_base_patch16_224", pretrained=False)
        apply_lora(model, 8)
        if spec is not None:
            pyra_lightning.apply_merging(model, spec, pyra=pyra, **rule)
        mark_trainable(model)
        out[name] = model
    return out


def models(
    backbone: str = "vit_base_patch16_224", timm_kwargs: dict[str, Any] | None = None, fold: bool = True
) -> dict[str, torch.nn.Module]:
    """The forward rows; ``fold`` folds the ``+kernels`` rows' metric as ``compile_for_inference``
    deploys them (the family's ``fold_metric``)."""
    from pyra_lightning.families import find_family

    out = {}
    for name, spec, pyra in [
        ("uncompressed", None, False),
        ("tome/high", "high", False),
        ("pyra/low", "low", True),
        ("pyra/high", "high", True),
        ("tome/high+kernels", "high", False),
        ("pyra/high+kernels", "high", True),
    ]:
        torch.manual_seed(0)
        kernels = {"matcher": "triton", "merger": "triton", "attention": "triton"}
        rule = kernels if name.endswith("+kernels") else {}
        with torch.device("meta" if rule else "cpu"):
            model = timm.create_model(backbone, pretrained=False, **(timm_kwargs or {}))
        if spec is not None:
            pyra_lightning.apply_merging(model, spec, pyra=pyra, **rule)
        if rule and fold:  # as compile_for_inference deploys a Triton-rule model
            find_family(model).fold_metric(model)
        out[name] = model
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--train", action="store_true", help="count a training step, not a forward")
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="forward rows: a timm name")
    parser.add_argument("--timm_kwargs", type=json.loads, default={}, help="JSON, to timm.create_model")
    parser.add_argument("--no_fold", action="store_true", help="+kernels rows keep the keys' mean")
    args = parser.parse_args()
    if args.train and (args.backbone != "vit_base_patch16_224" or args.timm_kwargs or args.no_fold):
        parser.error(
            "--train counts ViT-B/16 only; --backbone, --timm_kwargs and --no_fold are forward options"
        )
    result = {}
    rows = training_models() if args.train else models(args.backbone, args.timm_kwargs, not args.no_fold)
    for name, model in rows.items():
        ops = count_training_step(model) if args.train else count(model)
        result[name] = dict(ops.most_common())
        total = f"{sum(ops.values())} ops, {launching(ops)} launching a kernel"
        print(f"{name}: {total}  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
