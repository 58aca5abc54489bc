"""How far the Triton merge kernels are from the torch merge at one ViT-B/16 layer's shape.

Run under Triton's CPU interpreter (or on a GPU without it)::

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python tools/kernel_parity.py

Prints, for ToMe and PYRA (random weights, every one non-zero), the largest absolute difference
of the merged tokens and of their sizes between ``kernels.merging.triton_merge_wavg`` and
``merge.merge_wavg`` at (B 2, N 197, C 768), merge_r 16, one prefix token, sizes 1-4.
"""

from __future__ import annotations

import torch

from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg
from pyra_lightning.merge import bipartite_soft_matching, merge_wavg
from pyra_lightning.modulation import PyraModulation


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for pyra in (False, True):
        x = torch.randn(2, 197, 768, device=device)
        size = torch.randint(1, 5, (2, 197, 1), device=device).float()
        merge, _ = bipartite_soft_matching(torch.randn(2, 197, 64, device=device), 16, 1)
        mod = PyraModulation(16, 768).to(device) if pyra else None
        with torch.no_grad():
            for param in mod.parameters() if mod is not None else ():
                param.add_(torch.randn_like(param) * 0.5)
            if not kernel_applies(merge, x, size, mod):
                raise SystemExit("the Triton kernels run on CUDA tensors or under TRITON_INTERPRET=1")
            got, want = triton_merge_wavg(merge, x, size, mod), merge_wavg(merge, x, size, mod)
        tokens, sizes = ((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
        print(
            f"{'pyra' if pyra else 'tome'}: max abs diff tokens {tokens:.2e}, sizes {sizes:.2e} "
            f"(largest |token| {want[0].abs().max().item():.1f})"
        )


if __name__ == "__main__":
    main()
