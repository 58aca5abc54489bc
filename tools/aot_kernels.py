"""Compile the Triton merge kernels for a GPU that is not here, and print what each costs in registers.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not whether they compile:
it accepts a ``tl.dot`` tile under 16, a block that is not a power of two, or a tile too wide for
the registers. Triton compiles for any target without a device (its ``ptxas`` ships with it), so
this builds every kernel at the block sizes its launcher picks, for the given widths and dtypes,
and reads registers, spills (the stack frame) and shared memory from the cubin with the bundled
``cuobjdump``::

    PYTHONPATH=$PWD python tools/aot_kernels.py                       # sm_90 (H100/H200)
    PYTHONPATH=$PWD python tools/aot_kernels.py --target cuda:80 --channels 768 1024

``--channels`` are the token widths C the merge kernels see (the model's embed_dim); the matcher
and the attention see a head's (``--head_dim``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import subprocess
import tempfile
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyra_lightning.kernels import matching, merge_grad, merging, proportional

_INT = "i32"
_FLOATS = ("eps", "scale_log2")  # the float scalar arguments
_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One kernel built for one target: its configuration and what the cubin says it uses."""

    kernel: str
    config: str
    registers: int
    stack_bytes: int  # > 0: registers spilled to the stack (local memory)
    shared_bytes: int


def _compile(kernel: Any, pointers: dict[str, str], launch: dict[str, Any], target: GPUTarget) -> Any:
    """``triton.compile`` of ``kernel`` with the named pointer types; every other argument an int32
    (``eps`` an fp32), the constexprs and ``num_warps`` (default 4, as Triton's) from ``launch``."""
    constexprs = {key: value for key, value in launch.items() if key != "num_warps"}
    num_warps = launch.get("num_warps", 4)
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in _FLOATS else _INT)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def _usage(compiled: Any) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes) of a compiled kernel, from ``cuobjdump``.

    Spilled registers show as the function's STACK frame (and STL/LDL in its SASS).
    """
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        dump = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        )
    fields = dict(re.findall(r"(REG|STACK):(\d+)", dump.stdout))
    return int(fields["REG"]), int(fields["STACK"]), int(compiled.metadata.shared)


def _record(name: str, config: dict[str, Any], compiled: Any) -> Compiled:
    text = " ".join(f"{key}={value}" for key, value in config.items())
    return Compiled(name, text, *_usage(compiled))


def build(
    target: str, channels: list[int], head_dim: int, dtypes: list[str], num_tokens: int = 197
) -> list[Compiled]:
    """Every kernel at every width and dtype, with and without sizes, as the launchers configure
    them; the plan kernel (fp32 in, whatever the dtype) once per prefix case, for ``num_tokens``."""
    backend, arch = target.split(":")
    gpu = GPUTarget(backend, int(arch), 32)
    rows = []
    dtypes_first = _DTYPES[dtypes[0]]
    for dtype in (_DTYPES[d] for d in dtypes):
        blocks = matching.match_blocks(head_dim)
        config = {"dtype": dtype, "C": head_dim, **blocks}
        pointers = {"metric": f"*{dtype}", "node_max": "*fp32", "node_idx": "*i64"}
        compiled = _compile(matching.match_kernel(), pointers, dict(blocks), gpu)
        rows.append(_record("match_kernel", config, compiled))
        # the merge's backward: gradients in fp32; tokens in the model's dtype, with the fp32
        # residual stream (autocast) or without one
        grads = {n: "*fp32" for n in ("norm_w", "norm_b", "weight_r", "weight_d", "grad_tokens", "grad_m_t")}
        grads |= {n: "*fp32" for n in ("pairs", "grad", "partial", "scratch", "merged_size")}
        grads |= {"perm": "*i64", "dst_out": "*i64"}
        for width, residual in itertools.product(channels, (True, False)):
            stream = "fp32" if residual else dtype
            pointers = grads | {"x": f"*{dtype}", "residual": f"*{stream}", "size": f"*{stream}"}
            pointers |= {"grad_out": f"*{stream}", "merged_size": f"*{stream}"}
            tokens = {
                "HAS_RESIDUAL": residual,
                "SUM_DTYPE": tl.float32 if residual else getattr(tl, _TL[dtype]),
            }
            for merge_r in (1, 16, 98, merge_grad.MAX_PAIRS):
                blocks = merge_grad.pair_blocks(merge_r, width)
                constexprs = {"HAS_SIZE": True, **tokens, **blocks}
                compiled = _compile(merge_grad.pair_grad_kernel, pointers, constexprs, gpu)
                config = {"dtype": dtype, "C": width, "HAS_RESIDUAL": residual, "merge_r": merge_r, **blocks}
                rows.append(_record("pair_grad_kernel", config, compiled))
            for modulated in (True, False):
                constexprs = {"HAS_SIZE": True, "MODULATED": modulated, **merge_grad.PLACE_BLOCKS}
                compiled = _compile(merge_grad.place_kernel, pointers, constexprs, gpu)
                config = {"dtype": stream, "C": width, "MODULATED": modulated, **merge_grad.PLACE_BLOCKS}
                rows.append(_record("place_kernel", config, compiled))
        if dtype == dtypes_first:  # the plan reads fp32 maxima whatever the model's dtype
            na = (num_tokens + 1) // 2
            for sort_unmerged in (True, False):
                constexprs = {"SORT_UNMERGED": sort_unmerged, **matching.plan_blocks(na)}
                pointers = {"node_max": "*fp32", "node_idx": "*i64", "plan": "*i64"}
                compiled = _compile(matching.plan_kernel(), pointers, constexprs, gpu)
                rows.append(_record("plan_kernel", {"Na": na, **constexprs}, compiled))
        # proportional attention: q, k, v and the output in the model's dtype, sizes in the
        # residual stream's (fp32 under autocast; the model's own when held in it)
        blocks = proportional.attention_blocks(head_dim, _TORCH_DTYPES[dtype])
        pointers = {n: f"*{dtype}" for n in ("q", "k", "v", "size", "out")}
        constexprs = {"IEEE": dtype == "fp32", **blocks}
        compiled = _compile(proportional.attention_kernel(), pointers, constexprs, gpu)
        rows.append(_record("attention_kernel", {"dtype": dtype, "d": head_dim, **constexprs}, compiled))
        # with a residual, as a merging block calls them: under autocast the residual stream
        # and so the sum and the outputs are fp32 while the attention branch is in ``dtype``
        for width, has_size, residual in itertools.product(channels, (True, False), (True, False)):
            tokens = {
                "HAS_RESIDUAL": residual,
                "SUM_DTYPE": tl.float32 if residual else getattr(tl, _TL[dtype]),
            }
            stream = "fp32" if residual else dtype
            blocks = merging.modulate_blocks(width)
            pointers = {n: f"*{dtype}" for n in ("x", "norm_w", "norm_b", "weight_r", "weight_d")}
            pointers |= {"residual": f"*{stream}", "size": f"*{stream}", "perm": "*i64", "out": "*fp32"}
            constexprs = {"HAS_SIZE": has_size, **tokens, **blocks}
            compiled = _compile(merging.modulate_kernel, pointers, constexprs, gpu)
            config = {"dtype": dtype, "C": width, "HAS_SIZE": has_size, "HAS_RESIDUAL": residual, **blocks}
            rows.append(_record("modulate_kernel", config, compiled))
            # with the block's norm2 (whole rows per program) the norm's weights are in the
            # stream's dtype and its output in the model's (what the MLP's fc1 reads)
            for modulated, norm in itertools.product((True, False), (False, True)):
                blocks = merging.merge_blocks(width, norm=norm)
                pointers = {"x": f"*{dtype}", "perm": "*i64", "dst_out": "*i64", "sources": "*fp32"}
                pointers |= {
                    n: f"*{stream}" for n in ("residual", "size", "out", "out_size", "norm_w", "norm_b")
                }
                pointers |= {"normed": f"*{dtype}"}
                constexprs = {"HAS_SIZE": has_size, "MODULATED": modulated, "NORM": norm, **tokens, **blocks}
                compiled = _compile(merging.merge_kernel, pointers, constexprs, gpu)
                config = {"dtype": dtype, "C": width, "HAS_SIZE": has_size, "HAS_RESIDUAL": residual}
                config |= {"MODULATED": modulated, "NORM": norm, **blocks}
                rows.append(_record("merge_kernel", config, compiled))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 (Hopper), cuda:80")
    parser.add_argument("--channels", type=int, nargs="+", default=[384, 768, 1024, 1280, 1536])
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["bf16", "fp32"])
    args = parser.parse_args()
    rows = build(args.target, args.channels, args.head_dim, args.dtypes)
    print(
        f"{'kernel':<16} {'regs':>4} {'stack':>6} {'shared':>7}  config ({args.target}, triton {triton.__version__})"
    )
    for row in rows:
        print(f"{row.kernel:<16} {row.registers:>4} {row.stack_bytes:>6} {row.shared_bytes:>7}  {row.config}")


if __name__ == "__main__":
    main()
