"""The merge rule as parts of the block: a matcher decides which tokens merge, a merger combines them.

Every merging block holds one ``Matcher`` and one ``Merger`` (``block.matcher``,
``block.merger``), chosen by name in ``apply_merging(..., matcher=..., merger=...)``; the
block forward calls them and nothing else, so another rule (a fused GPU kernel, an elastic
schedule, another published matching) is one class and one ``register_matcher`` line::

    merge, unmerge = block.matcher(metric, block.merge_r, block.num_prefix_tokens)
    x, size = block.merger(merge, x, size, modulate=block.pyra)

The defaults are ToMe's and PYRA's (paper §3.1, eqs. 2-3): bipartite soft matching
(``merge.bipartite_soft_matching``) and the size-weighted average (``merge.merge_wavg``).
``"bipartite_reference"`` is the same matching in ToMe's plain gather/scatter/cat form
(``merge_reference``), slower but easy to read and compare against.

A rule that runs its own kernels names the registered torch rule it computes as ``counted_as``;
``accounting.count_flops`` counts that one, since a ``FlopCounterMode`` sees ATen operators only.

A merger whose ``fuses_residual`` is True is also called with ``residual=``: the tokens are then
``residual + x`` (the block's residual stream plus its attention branch), which it may add inside
its own kernels; the block adds them itself for every other merger. One whose ``fuses_norm`` is
True (the blocks ask it only of one that ``fuses_residual`` too) also has
``merge_and_norm(merge, x, size, modulate, residual, norm, norm_dtype)``, which returns the
block's next LayerNorm of the merged tokens as a third tensor (``norm2(x)``, which it may
compute in the same kernel); the block calls that one where it would call both. A merger may
also have ``weighted_mean(merge, rows, size)``: rows that ride along with the tokens (Eva's shared
rotary embeddings) as their size-weighted mean, or ``None`` where it cannot, and the block takes
torch's sum and division. It must weight by the same sizes the merger sums for the tokens.

A matcher returns ``merge``/``unmerge`` closures with the contract of ``merge.MergeFn``: modes
``"sum"``, ``"mean"`` and ``"amax"``, an optional PYRA ``modulate`` of the sources, and the
token order the next layer's alternating split expects (prefix tokens first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from pyra_lightning.kernels import compile_traced
from pyra_lightning.merge import MergeFn, Modulate, UnmergeFn, bipartite_soft_matching, merge_wavg
from pyra_lightning.merge_reference import bipartite_soft_matching_reference


@runtime_checkable
class Matcher(Protocol):
    """Decides which ``merge_r`` tokens merge into which, from the similarity ``metric`` (B, N, C')."""

    name: str

    def __call__(
        self, metric: torch.Tensor, merge_r: int, num_prefix_tokens: int
    ) -> tuple[MergeFn, UnmergeFn]: ...


@runtime_checkable
class Merger(Protocol):
    """Combines tokens with a matcher's ``merge``: (B, N, C) tokens and (B, N, 1) sizes to N - merge_r."""

    name: str

    def __call__(
        self,
        merge: MergeFn,
        x: torch.Tensor,
        size: torch.Tensor | None = None,
        modulate: Modulate | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class BipartiteMatcher:
    """ToMe's bipartite soft matching (eqs. 2-3), in ``merge.py``'s fast form."""

    name = "bipartite"

    def __call__(
        self, metric: torch.Tensor, merge_r: int, num_prefix_tokens: int
    ) -> tuple[MergeFn, UnmergeFn]:
        return bipartite_soft_matching(metric, merge_r, num_prefix_tokens)


class ReferenceBipartiteMatcher:
    """The same matching in ToMe's plain gather/scatter/cat form (``merge_reference``)."""

    name = "bipartite_reference"

    def __call__(
        self, metric: torch.Tensor, merge_r: int, num_prefix_tokens: int
    ) -> tuple[MergeFn, UnmergeFn]:
        return bipartite_soft_matching_reference(metric, merge_r, num_prefix_tokens)


class TritonMatcher:
    """Bipartite soft matching in two Triton kernels (CUDA): the scores' row max/argmax, then the
    order of sources and the merge plan's gather positions.

    The (B, Na, Nb) score matrix is never stored, and no torch sort, gather or cat runs
    (``kernels.matching``). It runs on CUDA tensors in eager mode, under CUDA-graph capture and
    compiled (``torch.compile`` keeps it as the ``pyra_lightning::match_plan`` operator,
    ``kernels.matching``); elsewhere, and while an export
    traces the model, it is the torch matcher. Ties: the lowest B index wins a row's maximum, as
    ``max`` does on the same device for distinct scores; exactly equal scores may pick another
    partner than torch's reduction.
    """

    name = "triton"
    counted_as = "bipartite"  # the torch rule a FLOP counter runs instead: it cannot see a kernel

    def __init__(self) -> None:
        import pyra_lightning.kernels.matching  # noqa: F401  (registers its operator before any compile)

    def __call__(
        self, metric: torch.Tensor, merge_r: int, num_prefix_tokens: int
    ) -> tuple[MergeFn, UnmergeFn]:
        from pyra_lightning.kernels.matching import triton_match

        exported = not compile_traced() and (
            torch.compiler.is_compiling() or torch.jit.is_tracing() or type(metric) is not torch.Tensor
        )
        return bipartite_soft_matching(
            metric, merge_r, num_prefix_tokens, match_fn=None if exported else triton_match
        )


class WeightedAverage:
    """The size-weighted average of ToMe and PYRA (``merge.merge_wavg``); PYRA modulates the sources."""

    name = "wavg"
    average = staticmethod(merge_wavg)

    def __call__(
        self,
        merge: MergeFn,
        x: torch.Tensor,
        size: torch.Tensor | None = None,
        modulate: Modulate | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.average(merge, x, size, modulate=modulate)


class TritonWeightedAverage(WeightedAverage):
    """The size-weighted average with PYRA's modulation and the size update in two Triton kernels.

    ``kernels.merging.triton_merge_wavg``: in inference on CUDA tensors (eager or under CUDA-graph
    capture) one layer's merge is two launches instead of about 30 operators, and compiled it is
    one ``pyra_lightning::merge_wavg`` node of the graph (``kernels.merging``). Where autograd
    records it (training) the kernels still run, through that operator and its backward written
    in torch (``kernels.merge_backward``); while an export traces the model, on CPU, for fp64 and
    for the ablation modulations it is ``merge_wavg`` itself. It takes the block's residual add too
    (``fuses_residual``): the kernels read the residual stream and the attention branch and add
    them as they load, so the (B, N, C) sum before the merge is never written.
    The kernels compute in fp32: equal to ``"wavg"`` up to the order of sums for fp32 tokens, and
    closer to exact than the torch path for bf16/fp16 tokens (or matmuls under bf16 autocast).
    """

    name = "triton"
    counted_as = "wavg"
    fuses_residual = True  # the block hands it the residual stream and the attention branch apart
    fuses_norm = True  # and its norm2: the merge kernel writes the merged tokens' LayerNorm too

    def __init__(self) -> None:
        import pyra_lightning.kernels.merge_norm  # noqa: F401  (registers its operators before any compile)

    def __call__(
        self,
        merge: MergeFn,
        x: torch.Tensor,
        size: torch.Tensor | None = None,
        modulate: Modulate | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from pyra_lightning.kernels.merging import triton_merge_wavg

        return triton_merge_wavg(merge, x, size, modulate=modulate, residual=residual)

    def merge_and_norm(
        self,
        merge: MergeFn,
        x: torch.Tensor,
        size: torch.Tensor | None,
        modulate: Modulate | None,
        residual: torch.Tensor | None,
        norm: torch.nn.Module,
        norm_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``self(merge, x, size, modulate, residual)`` and ``norm`` of the merged tokens, the norm
        written by the merge kernel where ``kernels.merge_norm`` can (else ``norm`` runs); with
        ``norm_dtype`` (the dtype the norm's consumer casts it to) it may be written in that."""
        from pyra_lightning.kernels.merge_norm import triton_merge_wavg_norm

        return triton_merge_wavg_norm(merge, x, size, modulate, residual, norm, norm_dtype)

    def weighted_mean(
        self, merge: MergeFn, rows: torch.Tensor, size: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Rows that ride along with the tokens (Eva's shared rotary embeddings, ``patch_eva``)
        merged into their size-weighted mean by one launch of the merge kernel, where torch takes
        a product, a gather, a sum and a division.

        Args:
            merge: The block's ``merge`` (a ``BipartiteMerge`` for the kernel to apply).
            rows: (B, N, R) rows; any strides (an embedding expanded over the batch is read once).
            size: (B, N, 1) sizes, the ones the tokens are weighted by; ``None``: all ones.

        Returns:
            (B, N - merge_r, R) in ``rows``' dtype, or ``None`` where the kernel does not apply
            (``kernel_applies``: exports, CPU without the interpreter, ...), and the caller takes
            torch's path as it always did.
        """
        from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg

        if not kernel_applies(merge, rows, size, None, differentiable=True):
            return None
        return triton_merge_wavg(merge, rows, size)[0]


MATCHERS: dict[str, Callable[[], Matcher]] = {
    "bipartite": BipartiteMatcher,
    "bipartite_reference": ReferenceBipartiteMatcher,
    "triton": TritonMatcher,
}
MERGERS: dict[str, Callable[[], Merger]] = {"wavg": WeightedAverage, "triton": TritonWeightedAverage}


def register_matcher(name: str, factory: Callable[[], Matcher]) -> None:
    """Make ``apply_merging(..., matcher=name)`` build its blocks' matcher with ``factory()``."""
    MATCHERS[name] = factory


def register_merger(name: str, factory: Callable[[], Merger]) -> None:
    """Make ``apply_merging(..., merger=name)`` build its blocks' merger with ``factory()``."""
    MERGERS[name] = factory


def _build(kind: str, registry: dict[str, Callable[[], object]], name: str) -> object:
    if name not in registry:
        raise ValueError(f"{kind}={name!r} is not registered; expected one of {', '.join(sorted(registry))}")
    built = registry[name]()
    if getattr(built, "name", None) != name:
        built.name = name  # type: ignore[attr-defined]  (the name export records)
    return built


def build_matcher(name: str) -> Matcher:
    """A fresh matcher registered as ``name``; ``ValueError`` naming the registered ones otherwise."""
    return _build("matcher", MATCHERS, name)  # type: ignore[return-value]


def build_merger(name: str) -> Merger:
    """A fresh merger registered as ``name``; ``ValueError`` naming the registered ones otherwise."""
    return _build("merger", MERGERS, name)  # type: ignore[return-value]
