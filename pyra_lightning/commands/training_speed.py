"""Training-step speed and memory of uncompressed, ToMe and PYRA ViTs (``benchmark --train``).

A training step is forward, cross-entropy and backward with only LoRA, PYRA and the head
trainable, as in ``fit``. Steps of several models are timed interleaved, by the protocol of
``pyra_lightning.timing``; the memory that merging saves is measured as the activations autograd
keeps for backward, which any device can count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyra_lightning.timing import (
    Precision,
    autocast,
    held,
    input_dtype,
    random_images,
    round_robin,
    synchronize,
    timed,
)


class _WeightCasts(TorchDispatchMode):
    """Records the copies of weights that autocast makes (``aten._to_copy`` of a weight) and keeps
    them alive while it is on, so that no activation can take a freed copy's address."""

    def __init__(self, weights: set[int]) -> None:
        super().__init__()
        self.weights = weights
        self.casts: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (
            func is torch.ops.aten._to_copy.default
            and isinstance(source, torch.Tensor)
            and source.untyped_storage().data_ptr() in self.weights
        ):
            self.casts[out.untyped_storage().data_ptr()] = out
        return out


def _saved_activation_bytes(step: Callable[[], object], params: Sequence[nn.Parameter]) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``step``, weights excluded.

    This is the activation memory that token merging shrinks, and unlike peak memory it can be
    measured on any device: a merged block saves activations of ``N - merge_r`` tokens only.
    Under autocast a linear saves the bf16/fp16 copy of its weight that autocast made; those
    copies are weights too (the same in every model, about 170 MB for ViT-B/16) and are left out.
    """
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}
    casts = _WeightCasts(weights)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in casts.casts:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), casts:
        step()
    return sum(storages.values())


def _training_step(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    precision: Precision,
    compiled: bool = False,
    compile_mode: str | None = None,
) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """``step()`` (forward, cross-entropy, backward, drop the gradients) and ``loss()`` alone;
    ``compiled``: the forward (and so its backward) through ``torch.compile(fullgraph=True)`` in
    ``compile_mode`` (``"reduce-overhead"``: both graphs replayed as CUDA graphs, so the host
    launches one graph where a merged step launches thousands of small kernels)."""
    target = torch.arange(x.shape[0], device=device) % model.num_classes
    forward = torch.compile(model, fullgraph=True, dynamic=False, mode=compile_mode) if compiled else model
    graphed = compiled and compile_mode in ("reduce-overhead", "max-autotune")

    def loss() -> torch.Tensor:
        with autocast(device, precision):
            out = forward(x)
        outputs = out if isinstance(out, tuple) else (out,)  # distilled DeiT trains two heads
        return sum(F.cross_entropy(o.float(), target) for o in outputs)

    def step() -> None:
        if graphed:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss().backward()
        model.zero_grad(set_to_none=True)

    return step, loss


def time_training_steps(
    models: Mapping[str, nn.Module],
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
    clock: Callable[[], float] = time.perf_counter,
    compiled: bool = False,
    compile_mode: str | None = None,
) -> dict[str, dict[str, float | str | None]]:
    """Images/s of a training step (forward, cross-entropy, backward) and its memory, per model.

    Only LoRA, PYRA and the head get gradients (``mark_trainable``, which this applies), as in
    training; no optimizer step is taken, because its cost does not depend on merging. Gradients
    are dropped after each step (``zero_grad(set_to_none=True)``) so every step allocates alike.
    Steps are interleaved round-robin, as in ``time_forwards``.

    Args:
        models: Timm ViTs with LoRA (not folded) and optionally merging, on ``device``.
        batch_size, img_size, device, precision, warmup, runs, clock: As in ``time_forwards``.
        compiled: Compile each model's training forward and backward (``torch.compile``,
            inductor, one graph per model); the compile happens in the warm-up, untimed.
        compile_mode: ``torch.compile``'s ``mode`` for ``compiled`` (``None``: the default;
            ``"reduce-overhead"``: CUDA graphs, on CUDA).

    Returns:
        Per model: ``images_per_s``; ``median_s``; ``trainable_params``; ``peak_memory_mb`` and
        ``peak_memory_source``: on CUDA the step's peak of ``torch.cuda.max_memory_allocated``
        above what was allocated before it, plus the model's own weights (what the model alone
        would reach, whatever else is resident); on CPU ``None``, because the CPU allocator keeps
        no peak and the process RSS high-water mark would include every other model; and
        ``saved_activations_mb``, the tensors autograd keeps for backward, on every device
        (eager only: a compiled graph decides what it saves; ``None`` there).
    """
    from pyra_lightning.patch import mark_trainable  # timm: imported when a benchmark runs

    device = torch.device(device)
    x = random_images(batch_size, img_size, device, input_dtype(precision))
    models = {name: held(model, precision) for name, model in models.items()}  # bf16-true: bf16 weights
    steps, losses = {}, {}
    for name, model in models.items():
        mark_trainable(model)
        model.train()
        steps[name], losses[name] = _training_step(model, x, device, precision, compiled, compile_mode)
    for _ in range(warmup):
        for step in steps.values():
            step()
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in models}
    transient = dict.fromkeys(models, 0)
    for name in round_robin(list(models), runs):
        if cuda:
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times[name].append(timed(steps[name], device, clock))
        if cuda:
            transient[name] = max(transient[name], torch.cuda.max_memory_allocated(device) - before)
    results = {}
    for name, model in models.items():
        median = statistics.median(times[name])
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        results[name] = {
            "images_per_s": batch_size / median,
            "median_s": median,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_memory_mb": (transient[name] + weights) / 2**20 if cuda else None,
            "peak_memory_source": "torch.cuda.max_memory_allocated" if cuda else None,
            "saved_activations_mb": None
            if compiled
            else _saved_activation_bytes(losses[name], list(model.parameters())) / 2**20,
        }
    return results


def measure_training_step(
    model: nn.Module,
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float | str | None]:
    """``time_training_steps`` for one model: training images/s, peak and activation memory."""
    return time_training_steps(
        {"model": model}, batch_size, img_size, device, precision, warmup, runs, clock
    )["model"]
