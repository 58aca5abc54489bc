"""PYRA token modulation (paper §3.2, eqs. 4-7) and the ablation variants of Tables 6-8.

A modulation acts on the ``merge_r`` token pairs a layer merges: the sources ``M_s`` (set A) and
their destinations ``M_t`` (set B), both given as (B, merge_r, C) in the token-major layout the
merge uses (the paper writes them channel-major, D x r). Following the reference
implementation, both are the size-weighted tokens ``x * size`` that the weighted average sums.

Only sources are modulated: they are distinct, whereas several sources may share a destination,
so modulating sources keeps the merge a single parallel scatter (paper §3.2).

Every variant starts as the identity, so a freshly patched model computes exactly ToMe.

Elastic runs (``pyra_lightning.training.elastic``) train one modulation for a range of merge
rates. Such a layer is built for the largest ``merge_r`` it meets in the range (``elastic=True``)
and, when fewer pairs arrive, uses the first rows of its per-pair weights (``W_r``, or ``full``'s
``W``): the merge hands sources over sorted by descending similarity, so row i always modulates
"the i-th best pair" of the layer, whatever the rate. ``truncated`` cuts such a layer down to one
rate for deployment. A layer built without ``elastic`` still refuses any other count.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["pyra", "pyra_plain", "w_r", "w_r_plain", "w_d", "w_d_plain", "full", "gated"]
VARIANTS: tuple[str, ...] = get_args(Variant)

GATED_HIDDEN = 4  # hidden width d of the gated generator (Table 8)


class PyraModulation(nn.Module):
    """Parallel-yielding re-activation of the tokens a layer merges.

    Variants (``variant``), named after the rows of Tables 6-8:

    - ``pyra``: both generators with sigmoid re-activation, eqs. 4-7 (the method).
    - ``pyra_plain``: both generators, sigmoids removed: ``M_s + δ_r ⊙ (δ_D ⊙ M_s)``.
    - ``w_r`` / ``w_r_plain``: channel weights only, ``M_s + (2σ(δ_D) - 1) ⊙ M_s`` / ``M_s + δ_D ⊙ M_s``.
    - ``w_d`` / ``w_d_plain``: token weights only, ``M_s + (2σ(δ_r) - 1) ⊙ M_s`` / ``M_s + δ_r ⊙ M_s``.
    - ``full``: one free matrix ``W_{D×r}`` per layer, ``M_s + (2σ(W) - 1) ⊙ M_s`` (Table 7).
    - ``gated``: a two-layer MLP D→4→D on ``M_info``, ``M_s + (2σ(MLP(M_info)) - 1) ⊙ M_s`` (Table 8).

    For the single-generator ablations the paper omits eq. 6 and uses the remaining generator's
    weight in eq. 7. It does not say how that generator starts; we start it at zero so that every
    variant is the identity at initialisation, like PYRA itself.

    The ``_plain`` variants ("w/o σ", Table 6) leave out each re-activation whole, ``2σ(·)`` of
    eq. 6 and ``2σ(·) - 1`` of eq. 7, keeping the raw weight. Removing only the σ, as the paper's
    words could be read, gives ``M_s + (2δ_r - 1) ⊙ 2δ_D ⊙ M_s``, which at initialisation
    (``δ_r = 0``) is ``M_s - 2δ_D ⊙ M_s``: not the identity, so such a run would not start from
    ToMe as every other variant does. tests/test_modulation.py writes every variant out in the
    paper's D x r layout.

    Parameter names keep the paper's symbols: ``weight_r`` is ``W_r`` (merge_r x 1, the reference's
    ``pyra_a``), ``weight_d`` is ``W_D`` (1 x D, the reference's ``pyra_b``), ``norm`` is the
    LayerNorm of eq. 4 (the reference's ``pyra_norm``).

    Args:
        merge_r: Tokens this layer merges; the shape of ``W_r`` depends on it.
        dim: Token width D.
        variant: Which modulation to build, see above.
        elastic: Accept fewer than ``merge_r`` pairs, using the first rows of the per-pair weights
            (elastic runs; see the module docstring).
    """

    def __init__(self, merge_r: int, dim: int, variant: Variant = "pyra", elastic: bool = False) -> None:
        super().__init__()
        if merge_r <= 0:
            raise ValueError(
                f"PyraModulation needs merge_r > 0, got {merge_r}; layers that merge nothing hold no PYRA"
            )
        if variant not in VARIANTS:
            raise ValueError(f"unknown PYRA variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self.merge_r = merge_r
        self.dim = dim
        self.variant = variant
        self.elastic = elastic
        base = variant.removesuffix("_plain")
        self.activation = not variant.endswith("_plain")
        self.norm = nn.LayerNorm(dim) if base in ("pyra", "w_r", "w_d", "gated") else None
        self.weight_r = nn.Parameter(torch.empty(merge_r, 1)) if base in ("pyra", "w_r") else None
        self.weight_d = nn.Parameter(torch.zeros(1, dim)) if base in ("pyra", "w_d") else None
        self.weight = nn.Parameter(torch.zeros(merge_r, dim)) if base == "full" else None
        if base == "gated":
            self.fc1 = nn.Linear(dim, GATED_HIDDEN)
            self.fc2 = nn.Linear(GATED_HIDDEN, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``W_r`` random, ``W_D`` zero (§3.2), so eq. 7 adds nothing at the start of training.

        §3.2 says "random Gaussian" for ``W_r``; the reference implementation's default ("sqrt")
        draws it kaiming-uniform instead, and we follow the code, whose training we retrace
        (tests/test_recipe.py). With ``W_D = 0`` either draw starts as the identity.
        """
        if self.weight_r is not None:
            if self.variant.startswith("pyra"):
                # kaiming-uniform with a=sqrt(5), as nn.Linear's weight
                nn.init.kaiming_uniform_(self.weight_r, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.weight_r)
        if self.weight_d is not None:
            nn.init.zeros_(self.weight_d)
        if self.weight is not None:
            nn.init.zeros_(self.weight)
        if self.variant == "gated":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def _act(self, delta: torch.Tensor) -> torch.Tensor:
        """Re-activation of a weight that multiplies the residual branch: 2σ(δ) - 1 (eq. 7)."""
        return 2 * torch.sigmoid(delta) - 1 if self.activation else delta

    def truncated(self, merge_r: int) -> PyraModulation:
        """A plain (non-elastic) copy for ``merge_r`` pairs: the first ``merge_r`` rows of the
        per-pair weights, every other parameter as it is. What an elastic layer computes at
        ``merge_r``, with the shapes a layer built for ``merge_r`` has (for export)."""
        if not 0 < merge_r <= self.merge_r:
            raise ValueError(f"cannot truncate a PYRA layer of merge_r={self.merge_r} to {merge_r} pairs")
        ref = next(self.parameters())
        out = PyraModulation(merge_r, self.dim, self.variant).to(device=ref.device, dtype=ref.dtype)
        state = {k: v[:merge_r] if k in ("weight_r", "weight") else v for k, v in self.state_dict().items()}
        out.load_state_dict(state)
        return out

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Modulate sources ``src`` (B, merge_r, C) given their destinations ``dst`` (same shape)."""
        rows = src.shape[-2]
        if rows != self.merge_r and not (self.elastic and 0 < rows < self.merge_r):
            raise ValueError(
                f"PYRA layer built for merge_r={self.merge_r}"
                f"{' (elastic: at most that many)' if self.elastic else ''} received {rows} token pairs"
            )
        weight_r, weight = self.weight_r, self.weight
        if rows != self.merge_r:  # elastic, fewer pairs: the first rows (sources sorted by similarity)
            weight_r = None if weight_r is None else weight_r[:rows]  # (rows, 1)
            weight = None if weight is None else weight[:rows]  # (rows, C)
        if weight is not None:  # "full": a free W_{D×r}, no generators (Table 7)
            return src + (2 * torch.sigmoid(weight) - 1) * src
        info = src + dst if self.norm is None else self.norm(src + dst)  # M_info, eq. 4: (B, r, C)
        if self.variant == "gated":
            delta = self.fc2(F.gelu(self.fc1(info)))  # (B, r, C)
            return src + (2 * torch.sigmoid(delta) - 1) * src
        if weight_r is not None:
            delta_d = weight_r.transpose(0, 1) @ info  # δ_D = M_info W_r, eq. 5: (B, 1, C)
        if self.weight_d is not None:
            delta_r = info @ self.weight_d.transpose(0, 1)  # δ_r = W_D M_info, eq. 5: (B, r, 1)
        if weight_r is not None and self.weight_d is not None:
            scale_d = 2 * torch.sigmoid(delta_d) if self.activation else delta_d  # eq. 6
            return src + (src * scale_d) * self._act(delta_r)  # eq. 7
        if weight_r is not None:
            return src + self._act(delta_d) * src
        return src + self._act(delta_r) * src

    def extra_repr(self) -> str:
        elastic = ", elastic=True" if self.elastic else ""
        return f"merge_r={self.merge_r}, dim={self.dim}, variant={self.variant!r}{elastic}"


def resolve_variant(pyra: bool | str | None) -> Variant | None:
    """The one reading of ``pyra=``: ``True`` is eqs. 4-7 (``"pyra"``), ``False``/``None`` plain ToMe
    (no modulation), a name one of the ablations of Tables 6-8."""
    if pyra is True:
        return "pyra"
    if pyra is False or pyra is None:
        return None
    if pyra in VARIANTS:
        return pyra  # type: ignore[return-value]
    raise ValueError(f"pyra={pyra!r}: expected True, False or a variant name ({', '.join(VARIANTS)})")


def method_name(merging: bool, pyra: bool | str | None) -> str:
    """``peft`` (no merging), ``tome``, ``pyra`` or the ablation's name: how runs and results are labelled."""
    if not merging:
        return "peft"
    return resolve_variant(pyra) or "tome"
