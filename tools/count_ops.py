"""Count eager ATen operators per ViT-B/16 forward (batch 1, CPU, random weights), by op type.

PYTHONPATH=$PWD python tools/count_ops.py [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyra_lightning


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, batch: int = 1) -> collections.Counter[str]:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    counter = Counter()
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.ops


def models() -> dict[str, torch.nn.Module]:
    out = {}
    for name, spec, pyra in [
        ("uncompressed", None, False),
        ("tome/high", "high", False),
        ("pyra/high", "high", True),
        ("pyra/low", "low", True),
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
        json.dump(result, open(args.json, "w"), indent=1)
