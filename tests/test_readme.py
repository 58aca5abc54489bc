"""The README's Python example runs as printed and trains what it says it trains."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_trains_the_head_lora_and_pyra() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no ```python example"
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    model = namespace["model"]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert any(".pyra." in name for name in trainable)
    assert not any(name.startswith("patch_embed") or name.endswith("attn.qkv.weight") for name in trainable)
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
