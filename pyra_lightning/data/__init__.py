"""Data for pyra-lightning: the VTAB-1k DataModule, its task registry and the generated demo task."""

from pyra_lightning.data.demo import DEMO_CLASSES, generate_demo, render_demo_image
from pyra_lightning.data.vtab import (
    DEMO_TASK,
    GROUPS,
    NORMALIZATION_STATS,
    SPLIT_FILES,
    VTAB_TASKS,
    SplitRecord,
    VTABDataModule,
    VTABSplit,
    VTABTask,
    load_image,
    normalize_uint8,
    read_split_file,
    resolve_task,
)

__all__ = [
    "DEMO_CLASSES",
    "DEMO_TASK",
    "GROUPS",
    "NORMALIZATION_STATS",
    "SPLIT_FILES",
    "VTAB_TASKS",
    "SplitRecord",
    "VTABDataModule",
    "VTABSplit",
    "VTABTask",
    "generate_demo",
    "load_image",
    "normalize_uint8",
    "read_split_file",
    "render_demo_image",
    "resolve_task",
]
