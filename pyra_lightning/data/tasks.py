"""The registry of the 19 VTAB-1k tasks (and the generated ``demo``), without Lightning or torch.

Kept apart from the DataModule so that the report, the sweep and ``results.json`` checks can name
and group tasks without importing Lightning, timm or torchvision (their ``--help`` stays fast).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyra_lightning.data.demo import DEMO_CLASSES, DEMO_TASK_NAME

GROUPS: tuple[str, ...] = ("natural", "specialized", "structured")
CLASS_NAMES_FILE = "classes.txt"


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task.

    Attributes:
        name: canonical folder name, as in the NOAH/VPT release that PYRA uses.
        num_classes: number of classes; labels run from 0 to ``num_classes - 1``.
        group: ``"natural"``, ``"specialized"`` or ``"structured"`` (``"demo"`` for the generated task),
            the grouping over which the paper averages accuracies.
        aliases: other folder names in use for the same task, accepted wherever a task name is.
    """

    name: str
    num_classes: int
    group: str
    aliases: tuple[str, ...] = ()


# The paper's Table 2 order.
VTAB_TASKS: tuple[VTABTask, ...] = (
    VTABTask("cifar", 100, "natural", ("cifar100", "cifar_100")),
    VTABTask("caltech101", 102, "natural", ("caltech", "caltech_101")),
    VTABTask("dtd", 47, "natural", ("textures", "describable_textures")),
    VTABTask("oxford_flowers102", 102, "natural", ("flowers102", "flowers", "oxford_flowers", "flowers_102")),
    VTABTask(
        "oxford_iiit_pet", 37, "natural", ("oxford_pet", "oxford_pets", "pets", "pet", "oxford_iiit_pets")
    ),
    VTABTask("svhn", 10, "natural", ("svhn_cropped",)),
    VTABTask("sun397", 397, "natural", ("sun", "sun_397")),
    VTABTask("patch_camelyon", 2, "specialized", ("camelyon", "pcam", "patchcamelyon")),
    VTABTask("eurosat", 10, "specialized", ("euro_sat",)),
    VTABTask("resisc45", 45, "specialized", ("resisc", "resisc_45")),
    VTABTask("diabetic_retinopathy", 5, "specialized", ("retinopathy", "diabetic_retinopathy_detection")),
    VTABTask("clevr_count", 8, "structured", ("clevr_counting", "clevr_count_all")),
    VTABTask("clevr_dist", 6, "structured", ("clevr_distance", "clevr_closest_object_distance")),
    VTABTask("dmlab", 6, "structured", ("dm_lab",)),
    VTABTask("kitti", 4, "structured", ("kitti_dist", "kitti_distance", "kitti_closest_vehicle_distance")),
    VTABTask("dsprites_loc", 16, "structured", ("dsprites_location", "dsprites_position", "dsprites_xpos")),
    VTABTask("dsprites_ori", 16, "structured", ("dsprites_orientation",)),
    VTABTask("smallnorb_azi", 18, "structured", ("smallnorb_azimuth",)),
    VTABTask("smallnorb_ele", 9, "structured", ("smallnorb_elevation",)),
)
DEMO_TASK = VTABTask(DEMO_TASK_NAME, len(DEMO_CLASSES), "demo")


def _normalize_name(name: str) -> str:
    """Fold case and ``-``/``_`` so that ``CIFAR-100``, ``cifar_100`` and ``cifar100`` compare sanely."""
    return name.strip().lower().replace("-", "_")


def _build_lookup(tasks: Sequence[VTABTask]) -> dict[str, VTABTask]:
    lookup: dict[str, VTABTask] = {}
    for task in tasks:
        for name in (task.name, *task.aliases):
            key = _normalize_name(name)
            if key in lookup and lookup[key] is not task:  # guards future edits of the table above
                raise RuntimeError(
                    f"VTAB task name {name!r} is used by both {lookup[key].name} and {task.name}"
                )
            lookup[key] = task
    return lookup


_LOOKUP = _build_lookup((*VTAB_TASKS, DEMO_TASK))


def _known_names() -> str:
    return ", ".join(task.name for task in (*VTAB_TASKS, DEMO_TASK))


def resolve_task(name: str) -> VTABTask:
    """Look up a task by its canonical name or any alias (case and ``-``/``_`` insensitive).

    Raises:
        ValueError: for a name that is neither a VTAB-1k task nor ``demo``; the message lists them.
    """
    try:
        return _LOOKUP[_normalize_name(name)]
    except KeyError:
        raise ValueError(
            f"unknown VTAB-1k task {name!r}; known tasks: {_known_names()} (aliases such as 'cifar100' work too)"
        ) from None


def read_class_names(task_dir: Path, task: VTABTask | None, num_classes: int) -> tuple[str, ...] | None:
    """Class names of a task, where it has them: the demo's shapes, or ``<task_dir>/classes.txt``.

    The VTAB-1k release ships labels as integers only; a ``classes.txt`` with one name per line
    (line ``i`` names label ``i``) gives ``predictions.csv`` readable names.

    Raises:
        ValueError: ``classes.txt`` does not list exactly ``num_classes`` names.
    """
    if task is not None and task.name == DEMO_TASK_NAME:
        return DEMO_CLASSES
    path = Path(task_dir) / CLASS_NAMES_FILE
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != num_classes:
        raise ValueError(f"{path}: lists {len(names)} class names, expected {num_classes} (one per line)")
    return names
