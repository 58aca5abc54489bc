"""Data for pyra-lightning: the VTAB-1k DataModule, its task registry and the generated demo task.

Names are imported on first use (PEP 562): ``pyra_lightning.data.tasks`` (the registry) is read by
the report and the sweep without importing Lightning, torch or torchvision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyra_lightning._lazy import lazy_exports

if TYPE_CHECKING:
    from pyra_lightning.data.datasets import VTABSplit, load_image, normalize_uint8
    from pyra_lightning.data.demo import DEMO_CLASSES, generate_demo, render_demo_image
    from pyra_lightning.data.layouts import SPLIT_FILES, SplitRecord, read_split_file
    from pyra_lightning.data.tasks import DEMO_TASK, GROUPS, VTAB_TASKS, VTABTask, resolve_task
    from pyra_lightning.data.vtab import NORMALIZATION_STATS, VTABDataModule

_EXPORTS: dict[str, str] = {
    "DEMO_CLASSES": "pyra_lightning.data.demo",
    "generate_demo": "pyra_lightning.data.demo",
    "render_demo_image": "pyra_lightning.data.demo",
    "DEMO_TASK": "pyra_lightning.data.tasks",
    "GROUPS": "pyra_lightning.data.tasks",
    "VTAB_TASKS": "pyra_lightning.data.tasks",
    "VTABTask": "pyra_lightning.data.tasks",
    "resolve_task": "pyra_lightning.data.tasks",
    "NORMALIZATION_STATS": "pyra_lightning.data.vtab",
    "SPLIT_FILES": "pyra_lightning.data.layouts",
    "SplitRecord": "pyra_lightning.data.layouts",
    "VTABDataModule": "pyra_lightning.data.vtab",
    "VTABSplit": "pyra_lightning.data.datasets",
    "load_image": "pyra_lightning.data.datasets",
    "normalize_uint8": "pyra_lightning.data.datasets",
    "read_split_file": "pyra_lightning.data.layouts",
}
__all__ = [
    "DEMO_CLASSES",
    "DEMO_TASK",
    "GROUPS",
    "NORMALIZATION_STATS",
    "SPLIT_FILES",
    "SplitRecord",
    "VTABDataModule",
    "VTABSplit",
    "VTABTask",
    "VTAB_TASKS",
    "generate_demo",
    "load_image",
    "normalize_uint8",
    "read_split_file",
    "render_demo_image",
    "resolve_task",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
