"""Count eager ATen operators per ViT-B/16 forward (random weights, CPU, batch 1), by operator.

    PYTHONPATH=$PWD python tools/count_ops.py [--json out.json]

Counted the way issue 17 counts them: a ``TorchDispatchMode`` under ``torch.inference_mode``
(which sees composite operators such as ``linear`` once), after one warm-up forward that fills
``pyra_lightning.merge``'s cache of constant index tensors.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyra_lightning


class OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, batch: int = 1) -> collections.Counter[str]:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.inference_mode():
        model(x)  # warm-up: builds the cached constants once
        counter = OperatorCounter()
        with counter:
            model(x)
    return counter.ops


def models() -> dict[str, torch.nn.Module]:
    out = {}
    for name, spec, pyra in [
        ("uncompressed", None, False),
        ("tome/high", "high", False),
        ("pyra/low", "low", True),
        ("pyra/high", "high", True),
    ]:
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        if spec is not None:
            pyra_lightning.apply_merging(model, spec, pyra=pyra)
        out[name] = model
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {}
    for name, model in models().items():
        ops = count(model)
        result[name] = dict(ops.most_common())
        print(f"{name}: {sum(ops.values())} ops  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
