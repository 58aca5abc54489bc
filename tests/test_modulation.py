"""PYRA's eqs. 4-7 and the ablations of Tables 6-8, written out as the paper writes them.

The paper's layout is channel-major: ``M_s, M_t`` are D x r (a column per token), ``W_r`` is r x 1
and ``W_D`` is 1 x D. The code is token-major, (B, r, D). These tests compute each formula image by
image in the paper's layout, with every parameter random (so no term is zero, and no variant is
the identity it is at initialisation), and compare with ``PyraModulation`` and with the fused
path the merge runs (``merge._modulate_with_size``). The golden outputs of the reference code
(tests/test_interop.py) cover ``pyra`` alone; the ablations are checked only here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from pyra_lightning.merge import _modulate_with_size
from pyra_lightning.modulation import VARIANTS, PyraModulation

MERGE_R, DIM, BATCH = 5, 12, 3
Paper = Callable[[PyraModulation, torch.Tensor, torch.Tensor], torch.Tensor]


def layer_norm_columns(m: torch.Tensor, module: PyraModulation) -> torch.Tensor:
    """Eq. 4's LayerNorm of a D x r matrix: each column (token) normalised over its D channels."""
    assert module.norm is not None
    mean = m.mean(dim=0, keepdim=True)  # (1, r)
    var = m.var(dim=0, unbiased=False, keepdim=True)  # (1, r)
    return (m - mean) / torch.sqrt(var + module.norm.eps) * module.norm.weight[:, None] + module.norm.bias[
        :, None
    ]


def generators(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Eqs. 4-5: M_info (D x r), δ_D = M_info W_r (D x 1), δ_r = W_D M_info (1 x r), each broadcast
    to D x r (the paper's hats); a generator the variant lacks gives None."""
    m_info = layer_norm_columns(m_s + m_t, module)  # eq. 4
    d, r = m_s.shape
    delta_d = None if module.weight_r is None else (m_info @ module.weight_r).expand(d, r)  # eq. 5
    delta_r = None if module.weight_d is None else (module.weight_d @ m_info).expand(d, r)  # eq. 5
    return m_info, delta_d, delta_r


def pyra(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    _, delta_d, delta_r = generators(module, m_s, m_t)
    m_hat = 2 * torch.sigmoid(delta_d) * m_s  # eq. 6
    return m_s + (2 * torch.sigmoid(delta_r) - 1) * m_hat  # eq. 7


def pyra_plain(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    # Table 6 "w/o σ": each re-activation (2σ(·) in eq. 6, 2σ(·) - 1 in eq. 7) left out, so that
    # the variant starts as the identity, as PYRA does (see PyraModulation's docstring)
    _, delta_d, delta_r = generators(module, m_s, m_t)
    return m_s + delta_r * (delta_d * m_s)


def w_r(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    # one generator: eq. 6 omitted, its broadcast weight in place of δ_r in eq. 7 (§4.4)
    _, delta_d, _ = generators(module, m_s, m_t)
    return m_s + (2 * torch.sigmoid(delta_d) - 1) * m_s


def w_r_plain(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    _, delta_d, _ = generators(module, m_s, m_t)
    return m_s + delta_d * m_s


def w_d(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    _, _, delta_r = generators(module, m_s, m_t)
    return m_s + (2 * torch.sigmoid(delta_r) - 1) * m_s


def w_d_plain(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    _, _, delta_r = generators(module, m_s, m_t)
    return m_s + delta_r * m_s


def full(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    # Table 7: one learned W (D x r), no generators; stored token-major as (r, D)
    assert module.weight is not None
    return m_s + (2 * torch.sigmoid(module.weight.T) - 1) * m_s


def gated(module: PyraModulation, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    # Table 8: a D -> 4 -> D MLP applied to each column of M_info
    m_info, _, _ = generators(module, m_s, m_t)
    hidden = F.gelu(module.fc1.weight @ m_info + module.fc1.bias[:, None])  # (4, r)
    delta = module.fc2.weight @ hidden + module.fc2.bias[:, None]  # (D, r)
    return m_s + (2 * torch.sigmoid(delta) - 1) * m_s


PAPER: dict[str, Paper] = {
    "pyra": pyra,
    "pyra_plain": pyra_plain,
    "w_r": w_r,
    "w_r_plain": w_r_plain,
    "w_d": w_d,
    "w_d_plain": w_d_plain,
    "full": full,
    "gated": gated,
}


def random_module(variant: str, seed: int = 0) -> PyraModulation:
    torch.manual_seed(seed)
    module = PyraModulation(MERGE_R, DIM, variant).double()  # type: ignore[arg-type]
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)
    return module


def test_every_variant_has_its_formula_here() -> None:
    assert set(PAPER) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_module_computes_the_papers_equations(variant: str) -> None:
    module = random_module(variant)
    src, dst = (
        torch.randn(BATCH, MERGE_R, DIM, dtype=torch.float64),
        torch.randn(BATCH, MERGE_R, DIM, dtype=torch.float64),
    )
    got = module(src, dst)  # (B, r, D)
    for image in range(BATCH):
        want = PAPER[variant](module, src[image].T, dst[image].T)  # (D, r)
        torch.testing.assert_close(got[image].T, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, src), "random parameters: the modulation is not the identity"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_merges_path_computes_the_papers_equations(variant: str) -> None:
    """What the merge runs (the fused eqs. 4-7 for ``pyra``, the module otherwise) on (B, r, D + 1)
    pairs whose last channel is the token size, which must pass through unchanged."""
    module = random_module(variant, seed=1)
    src, dst = (
        torch.randn(BATCH, MERGE_R, DIM + 1, dtype=torch.float64),
        torch.randn(BATCH, MERGE_R, DIM + 1, dtype=torch.float64),
    )
    got = _modulate_with_size(module, src, dst, DIM)
    assert torch.equal(got[..., DIM], src[..., DIM]), "the size channel is not modulated"
    for image in range(BATCH):
        want = PAPER[variant](module, src[image, :, :DIM].T, dst[image, :, :DIM].T)
        torch.testing.assert_close(got[image, :, :DIM].T, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_starts_as_the_identity(variant: str) -> None:
    """§3.2: W_D starts at zero, so eq. 7 adds nothing and a fresh model computes ToMe."""
    module = PyraModulation(MERGE_R, DIM, variant)  # type: ignore[arg-type]
    src, dst = torch.randn(BATCH, MERGE_R, DIM), torch.randn(BATCH, MERGE_R, DIM)
    assert torch.equal(module(src, dst), src)
