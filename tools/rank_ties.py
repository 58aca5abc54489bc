"""Why one image in a batch can change its PYRA logits by more than rounding: ties of rank.

    PYTHONPATH=$PWD python tools/rank_ties.py [--batch 64] [--model vit_tiny_patch16_224]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python tools/rank_ties.py --triton   # kernels vs torch, batch

``--triton`` first compares the batch's logits on the Triton matcher, merger and attention with
the torch rule's (on CPU under the interpreter, minutes at batch 64).

PYRA's ``W_r`` (eq. 5) weights the merged pairs by their rank in the descending order of the
matching's maxima, so two A tokens whose maxima are within rounding of each other may swap ranks,
and then each pair gets the other's weight: a step in the output, not a rounding difference. The
torch rule alone shows it: a batch's matrix products round differently from one image's (blocked
otherwise), which moves the maxima by ~1e-7. This runs one random-weight PYRA model (``high``)
on a batch and on each image alone, lists the images whose logits differ by more than 1e-3, and,
for the worst, the first layer whose plan differs and the A tokens that swapped, with their maxima.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import timm
import torch

from pyra_lightning import apply_merging, set_merge_rule
from pyra_lightning.merge import match, node_maxima

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import randomize_  # noqa: E402  (the tests' weight drawing, so the figures match theirs)


def recorded_metrics(model: torch.nn.Module) -> list[tuple[torch.Tensor, int, int]]:
    """Wrap each block's matcher so that every forward appends (metric, merge_r, prefix tokens)."""
    seen: list[tuple[torch.Tensor, int, int]] = []
    for block in model.blocks:
        inner = block.matcher

        def record(metric: torch.Tensor, merge_r: int, prefix: int, inner: Any = inner) -> Any:
            seen.append((metric.clone(), merge_r, prefix))
            return inner(metric, merge_r, prefix)

        block.matcher = record
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--triton", action="store_true", help="also the Triton rule on the batch")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100)
    apply_merging(model, "high", pyra=True)
    randomize_(model, std=0.2).eval()  # W_r and W_D start at 0 (no modulation): draw them
    torch.nn.init.normal_(model.head.weight, std=0.2)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    if args.triton:
        kernels = set_merge_rule(copy.deepcopy(model), matcher="triton", merger="triton", attention="triton")
        with torch.no_grad():
            want, got = model(x), kernels(x)
        gap = (got - want).abs().amax(dim=-1)
        print(f"Triton rule vs torch rule on the batch: median {gap.median().item():.1e}, images > 1e-3:")
        print(
            f"  {(gap > 1e-3).nonzero().flatten().tolist()} (max {gap.max().item():.3f}), "
            f"top-1 agreement {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.3f}"
        )
    seen = recorded_metrics(model)
    with torch.no_grad():
        together = model(x)
        batch_metrics, seen[:] = list(seen), []
        alone = torch.cat([model(x[i : i + 1]) for i in range(args.batch)])  # seen: image-major
    diff = (together - alone).abs().amax(dim=-1)  # (B,)
    print(f"{args.model}, PYRA high, random weights, batch {args.batch} vs each image alone (torch rule):")
    print(f"  logit scale {together.abs().max().item():.2f}, median difference {diff.median().item():.1e}")
    outliers = (diff > 1e-3).nonzero().flatten().tolist()
    print(f"  images differing by > 1e-3: {outliers} (max {diff.max().item():.3f})")
    if not outliers:
        return
    image = int(diff.argmax())
    layers = len(batch_metrics)
    for layer in range(layers):
        metric, merge_r, prefix = batch_metrics[layer]
        metric_alone = seen[image * layers + layer][0]  # (1, N, C')
        in_batch = match(metric[image : image + 1], merge_r, prefix)
        by_itself = match(metric_alone, merge_r, prefix)
        if all(torch.equal(u, v) for u, v in zip(in_batch, by_itself, strict=True)):
            continue
        src_batch, src_alone = in_batch[0][0], by_itself[0][0]
        ranks = (src_batch != src_alone).nonzero().flatten().tolist()
        shift = (metric[image] - metric_alone[0]).abs().max().item()
        print(
            f"  image {image}: first plan difference in layer {layer} (merge_r {merge_r}), metrics {shift:.1e} apart"
        )
        print(
            f"    sources at ranks {ranks}: {src_batch[ranks].tolist()} in the batch, {src_alone[ranks].tolist()} alone"
        )
        best_batch = node_maxima(metric[image : image + 1], prefix).values[0]  # what match ranks
        best_alone = node_maxima(metric_alone, prefix).values[0]
        for token in sorted(set(src_batch[ranks].tolist())):
            print(
                f"    A token {token}: maximum {best_batch[token]:.9f} in the batch, {best_alone[token]:.9f} alone"
            )
        return


if __name__ == "__main__":
    main()
