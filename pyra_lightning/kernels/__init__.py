"""Fused kernels for the merge path, with the torch code of ``pyra_lightning.merge`` as fallback.

- ``matching``: bipartite soft matching (eq. 3) as two Triton kernels: normalise, a·bᵀ, prefix
  mask and row max/argmax without storing the (B, Na, Nb) scores, then the ordering of sources
  and the whole merge plan (``perm``, ``dst_out``) in one launch (``triton_match``);
- ``merging``: the size-weighted merge with PYRA's modulation (eqs. 4-7) and the size update
  in two Triton kernels (``triton_merge_wavg``; the ``"triton"`` merger);
- ``merge_backward``: the analytic backward of ``pyra_lightning::merge_wavg``, so a training
  step keeps the merge kernels; ``merge_grad``: that backward as two Triton kernels in eager
  steps (the torch formula where a graph is traced);
- ``attention``: the table of kernels proportional attention runs on (``ATTENTIONS``: SDPA with
  a ``log(size)`` mask, FlexAttention with a ``score_mod``, ``proportional``'s kernel, and SDPA
  unmasked with ``log(size)`` in one more key channel);
- ``proportional``: proportional attention as one Triton flash-attention kernel that reads the
  sizes per block of keys (``triton_proportional_attention``; the ``"triton"`` attention).

Each kernel function has the semantics of its torch counterpart and dispatches to Triton only
for CUDA tensors when Triton imports (``use_triton``); anything else runs the torch path. Under
``torch.compile`` the kernels are custom operators (``pyra_lightning::match_plan`` in ``matching``,
``pyra_lightning::merge_wavg`` in ``merging``, ``pyra_lightning::proportional_attention`` in
``proportional``), one opaque node each in the compiled graph:
inductor cannot trace a Triton launch made from Python, so before they existed a compiled
``"triton"`` rule ran the torch rule. Exports take the torch path, since an exported graph must
run where Triton and this package are not. Tests run the kernels on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch


def triton_available() -> bool:
    """Triton imports here (it ships with torch's CUDA builds)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel runs for these tensors: CUDA tensors (or the interpreter) and Triton,
    outside ``torch.func`` transforms. Under ``jvp`` or ``vmap`` the tensors are functorch wrappers
    (of Python type ``torch.Tensor``): a kernel would silently drop a tangent (the operators have
    no forward-mode rule) or fail on the wrapper's storage, so there the torch code runs."""
    if not triton_available() or torch._C._are_functorch_transforms_active():
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


def on_device_of(tensor: torch.Tensor) -> Any:
    """A context in which Triton launches on ``tensor``'s GPU (it launches on the current one)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def compile_traced() -> bool:
    """Whether ``torch.compile`` is tracing now, as opposed to running eager or exporting a graph:
    the one case in which the kernels are called through their custom operators. Eager calls
    launch directly (a dispatcher round trip per layer would be host time for nothing)."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    return torch.compiler.is_compiling()
