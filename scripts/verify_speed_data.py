"""Tasks in the VTAB-1k layout for timing ``pyra-lightning data verify`` (BENCHMARKS.md).

One task per image kind (PNG 32/96/224 px, JPEG 1024x768), ``N`` images each: 40 in train800,
10 in val200, the rest in test. The content is smooth random noise; decoding costs the same
whatever a picture shows.

    python scripts/verify_speed_data.py OUT_ROOT N
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, n = Path(sys.argv[1]), int(sys.argv[2])
kinds = {
    "png32": ((32, 32), "PNG"),
    "png96": ((96, 96), "PNG"),
    "png224": ((224, 224), "PNG"),
    "jpeg1024": ((1024, 768), "JPEG"),
}
rng = np.random.default_rng(0)
for name, ((w, h), fmt) in kinds.items():
    task = root / name
    (task / "images").mkdir(parents=True, exist_ok=True)
    ext = "png" if fmt == "PNG" else "jpg"
    lines = []
    for i in range(n):
        small = rng.integers(0, 256, (max(h // 8, 4), max(w // 8, 4), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)  # smooth, photo-like entropy
        img.save(task / "images" / f"{i}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        lines.append(f"images/{i}.{ext} {i % 4}")
    (task / "train800.txt").write_text("\n".join(lines[:40]) + "\n")
    (task / "val200.txt").write_text("\n".join(lines[40:50]) + "\n")
    (task / "train800val200.txt").write_text("\n".join(lines[:50]) + "\n")
    (task / "test.txt").write_text("\n".join(lines[50:]) + "\n")
    print(name, n, "images")
