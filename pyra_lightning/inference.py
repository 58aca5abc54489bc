"""``compile_for_inference``: the merged model without host overhead, at one input shape.

Why. On an H200 the merged ViT-B/16 is launch-bound below batch ~128: its kernels finish faster
than Python issues them (BENCHMARKS.md, "GPU"). Token merging fixes every token count from the
schedule, so at a fixed batch size the whole forward has static shapes and can be captured
once and replayed, which removes the host from the loop.

Engines (``ENGINES``):

- ``eager``: the model itself under ``torch.no_grad`` (and autocast, if asked);
- ``inductor``: ``torch.compile(fullgraph=True, dynamic=False)``, compiled at construction and
  always run under ``torch.inference_mode`` (its guards check the grad mode), so its outputs are
  inference tensors;
- ``cudagraph``: the eager model captured whole into one CUDA graph with a static input and
  output buffer (warm-up on a side stream, then ``torch.cuda.graph``, as the CUDA-graph
  section of the torch docs prescribes); capture costs seconds, not a compile;
- ``inductor-cudagraph``: the inductor-compiled model (default mode) captured the same way.
  We capture it ourselves rather than use ``mode="reduce-overhead"``: one graph with the same
  static-buffer contract as ``cudagraph``, no CUDA-graph-tree bookkeeping on every call (host
  work again), and one code path for both graph engines.
- ``auto``: on CUDA the faster of ``eager`` and ``cudagraph``, measured at construction with
  CUDA events (a few replays each: the inductor engines cost a compile, so they run only when
  named); on CPU ``eager``: there is no launch overhead to remove, the eager CPU path already
  runs at 0.95-1.0 of its FLOPs-proportional ideal (BENCHMARKS.md, "CPU"), and an inductor
  compile costs tens of seconds per model and shape. A model attending with FlexAttention
  (``attention="flex"``) gets ``inductor-cudagraph`` on CUDA: eager FlexAttention is its unfused
  reference. On a CPU whose inductor cannot compile FlexAttention, ``inductor`` refuses in one
  line naming ``attention='sdpa'``.

The contract. The returned ``InferenceModel`` runs the model at the example's shape, dtype and
device only; any other input is refused with a ``ValueError`` naming both (no silent recompile,
no second graph). Outputs are fresh tensors: the graph engines copy the input into their
static buffer, replay, and return a ``clone()`` of the static output (a (B, classes) copy, so a
later call never overwrites a result the caller holds).

The model. A model with LoRA is deep-copied and the copy folded (``fold_lora``), so the caller's
model keeps its LoRA and stays trainable; a model without LoRA is used as is (no copy) and put
in eval mode. A model that matches with the Triton matcher also gets the merge metric folded into
its key projections (the family's ``fold_metric``: ViT's and Eva's ``qkv``, Eva's ``k_proj``; on
a copy, never the caller's model): one kernel fewer per merging layer, equal to the keys' mean
up to rounding, as that matcher's scores are. The graph engines read the parameters' memory at
replay, so compile a finished model: replacing parameters afterwards is not seen by a captured
graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from pyra_lightning.merge import cached_constants

# the engines that take the host out of the loop: one graph for the whole forward
GRAPH_ENGINES: tuple[str, ...] = ("inductor", "cudagraph", "inductor-cudagraph")
ENGINES: tuple[str, ...] = ("eager", *GRAPH_ENGINES)
_GRAPH_WARMUP = 3  # forwards on the side stream before capture (the torch docs use 3)
_BOUND_COMPILES = 256  # compiles of one model class's forward that bindings may ask for (``bound_compile``)


class InferenceModel:
    """A model bound to one input shape, dtype and device, run by one engine.

    Attributes:
        engine: The engine that runs it (``auto`` resolved).
        input_shape: The only accepted input shape, e.g. (64, 3, 224, 224).
        dtype: The only accepted input dtype.
        device: The only accepted input device.
        autocast_dtype: Autocast precision of the forward, or ``None``.
        timings_ms: With ``engine="auto"`` on CUDA, the measured ms per forward of each candidate.
        model: The module the engine runs (the folded copy when the model had LoRA).
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        model: nn.Module,
        engine: str,
        example: torch.Tensor,
        autocast_dtype: torch.dtype | None,
        timings_ms: dict[str, float] | None = None,
    ) -> None:
        self._run = run
        self.model = model
        self.engine = engine
        self.input_shape = tuple(example.shape)
        self.dtype = example.dtype
        self.device = example.device
        self.autocast_dtype = autocast_dtype
        self.timings_ms = timings_ms or {}

    def check(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` has the shape, dtype and device this was built for."""
        if tuple(x.shape) != self.input_shape or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"this {self.engine} model was built for input {self.input_shape} {self.dtype} on "
                f"{self.device}, got {tuple(x.shape)} {x.dtype} on {x.device}; build one per input "
                "shape with compile_for_inference(model, example_of_that_shape)"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self._run(x)

    def __repr__(self) -> str:
        return f"InferenceModel(engine={self.engine!r}, input={self.input_shape}, dtype={self.dtype}, device={self.device})"


def prepare_model(model: nn.Module) -> nn.Module:
    """The model an engine runs: every registered PEFT method's layers folded into a deep copy if
    present (what a deployment runs), in eval mode."""
    from pyra_lightning.patch import fold_lora
    from pyra_lightning.peft import peft_layers

    if any(isinstance(m, peft_layers()) for m in model.modules()):
        model = fold_lora(copy.deepcopy(model))
    return model.eval()


def fold_for_triton(model: nn.Module, original: nn.Module) -> nn.Module:
    """``model`` (``prepare_model``'s) with the merge metric folded into each merging block's
    projection (the family's ``fold_metric``) where its blocks match with the Triton matcher,
    whose scores already equal torch's only up to rounding; a copy if ``model`` is the caller's
    ``original``, which is never changed. Other models come back as they are."""
    from pyra_lightning.families import find_family

    matchers = {block.matcher.name for block in getattr(model, "blocks", ()) if hasattr(block, "matcher")}
    family = find_family(model)
    if matchers != {"triton"} or family is None:
        return model
    if model is original:
        model = copy.deepcopy(model)
    family.fold_metric(model)
    return model


def _autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> Any:
    if dtype is None:
        return nullcontext()
    # Graph capture needs the autocast weight cache off (torch docs, "CUDA Graphs").
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def _forward(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype | None):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(device, dtype):
            return fn(x)

    return run


def _attention(model: nn.Module) -> str:
    """The attention kernel of a model's blocks (``patch.attention_kernel``; ``"sdpa"`` without blocks)."""
    from pyra_lightning.patch import attention_kernel

    return attention_kernel(model) if hasattr(model, "blocks") else "sdpa"


@contextmanager
def bound_compile(model: nn.Module) -> Iterator[None]:
    """Around a compile that ``compile_for_inference`` asks for on purpose (one per model and
    batch size). Dynamo counts compiles of a piece of code, the model class's forward, across
    every model of the class, and stops at ``recompile_limit`` (8), a guard against accidental
    recompile storms: a benchmark of 5 merged models at 3 batch sizes binds 15 on purpose, so the
    limit is lifted to ``_BOUND_COMPILES`` for these. Past ``accumulated_recompile_limit``, one
    clear line instead of dynamo's ``Hard failure due to fullgraph=True``, also where the compile
    is not ``fullgraph`` (``benchmark --engine compile``), which would otherwise run eager silently."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    config = torch._dynamo.config
    limit = max(config.recompile_limit, _BOUND_COMPILES)
    try:
        with config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            yield
    except FailOnRecompileLimitHit as error:
        raise ValueError(
            f"torch.compile refused one more compile of {type(model).__name__}'s forward in this process: "
            f"every batch size bound, and every model of the class, is one compile of it, up to "
            f"torch._dynamo.config.recompile_limit ({limit} here) "
            f"and accumulated_recompile_limit ({config.accumulated_recompile_limit}); raise them to bind more"
        ) from error


def _compiled(
    model: nn.Module, example: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile``d now, on ``example``; afterwards any recompile is an error."""
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    try:
        # Compiled and always run under inference_mode, whatever the caller's grad mode: its
        # tensors carry other dispatch keys than no_grad's, which a graph's guards check.
        with bound_compile(model), torch.inference_mode(), _autocast(example.device, dtype):
            compiled(example)
    except ValueError:
        raise
    except Exception as error:
        if example.device.type != "cpu" or _attention(model) != "flex":
            raise
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"attention={_attention(model)!r} did not compile on this CPU ({type(error).__name__}: "
            f"{reason}); inductor's CPU FlexAttention template needs CPU features this one may lack: "
            "use attention='sdpa' here (the same function)"
        ) from error

    def run(x: torch.Tensor) -> torch.Tensor:
        # A guard that no longer holds (shapes are checked before this is reached) raises
        # instead of compiling a second graph silently.
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
            return compiled(x)

    return run


class _CapturedGraph:
    """One CUDA graph with its static input and output, and everything its replays read."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: torch.Tensor
    ) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        # merge.py's cached index tensors the graph read at capture: held as long as the graph,
        # so that the cache dropping them cannot free memory a replay reads
        self.constants = cached_constants()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def _capture(
    fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` captured into one CUDA graph with a static input and output; returns ``run(x)``.

    Everything runs with ``example``'s GPU current and the capture on a stream of that GPU:
    ``torch.cuda.graph`` otherwise captures on a process-wide stream made on whichever GPU was
    current first, and work queued for another GPU's streams would run once, outside the graph,
    leaving an empty graph that replays the example's outputs.
    """
    static_in = example.detach().clone()
    with torch.cuda.device(example.device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), _autocast(example.device, dtype, cache=False):
            for _ in range(_GRAPH_WARMUP):
                fn(static_in)  # compiles (inductor), fills allocator pools and merge.py's constant cache
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with (
            torch.no_grad(),
            _autocast(example.device, dtype, cache=False),
            torch.cuda.graph(graph, stream=stream),
        ):
            static_out = fn(static_in)
    return _CapturedGraph(graph, static_in, static_out)


def _ms_per_forward(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, runs: int = 10) -> float:
    """Milliseconds per call of ``run(x)``, timed by CUDA events on ``x``'s GPU."""
    with torch.cuda.device(x.device):  # events record on the current GPU's stream
        for _ in range(2):
            run(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            run(x)
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / runs


def compile_for_inference(
    model: nn.Module,
    example_input: torch.Tensor,
    engine: str = "auto",
    autocast_dtype: torch.dtype | None = None,
) -> InferenceModel:
    """Bind a (merged, LoRA-folded) model to ``example_input``'s shape, dtype and device.

    Args:
        model: A timm ViT/Eva, patched or not, with or without LoRA (see the module docstring
            for what happens to it).
        example_input: A batch of the shape, dtype and device every later call will have.
        engine: ``auto``, ``eager``, ``inductor``, ``cudagraph`` or ``inductor-cudagraph``.
        autocast_dtype: Run the forward under autocast in this dtype (e.g. ``torch.bfloat16``).

    Returns:
        An ``InferenceModel``: call it with a batch like ``example_input``.
    """
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"engine={engine!r}: expected one of auto, {', '.join(ENGINES)}")
    device = example_input.device
    if "cudagraph" in engine and device.type != "cuda":
        raise ValueError(
            f"engine {engine!r} captures a CUDA graph and needs a CUDA input; example_input is on {device}"
        )
    model = fold_for_triton(prepare_model(model), model)
    eager = _forward(model, device, autocast_dtype)
    timings: dict[str, float] = {}
    if engine == "auto" and device.type == "cuda" and _attention(model) == "flex":
        engine = "inductor-cudagraph"  # FlexAttention is one fused kernel only when compiled
    if engine == "auto":
        if device.type != "cuda":
            return InferenceModel(eager, model, "eager", example_input, autocast_dtype)
        graph = _capture(model, example_input, autocast_dtype)
        timings = {
            name: _ms_per_forward(fn, example_input) for name, fn in (("eager", eager), ("cudagraph", graph))
        }
        engine = min(timings, key=timings.__getitem__)
        run = eager if engine == "eager" else graph
    elif engine == "eager":
        run = eager
    elif engine == "inductor":
        run = _forward(_compiled(model, example_input, autocast_dtype), device, autocast_dtype)
    elif engine == "cudagraph":
        run = _capture(model, example_input, autocast_dtype)
    else:  # inductor-cudagraph
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with bound_compile(model):  # the capture's warm-up compiles it
            run = _capture(compiled, example_input, autocast_dtype)
    return InferenceModel(run, model, engine, example_input, autocast_dtype, timings)
