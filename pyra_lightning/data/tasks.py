"""The registry of the benchmarks' tasks: VTAB-1k's 19, FGVC-5 and the generated ``demo``.

Kept apart from the DataModule so that the report, the sweep, ``data verify`` and ``results.json``
checks can name and group tasks without importing Lightning, timm or torchvision (their ``--help``
stays fast).

Split sizes, and where they come from:

* VTAB-1k (Zhai et al., 2019; google-research/task_adaptation, ``task_adaptation/data/*.py``): every
  task's ``train800``/``val200``/``train800val200`` are 800/200/1000 images. The test split is the one
  task_adaptation defines per task, e.g. dSprites' last 10% of its 737,280 images (73,728), sNORB's
  second half of the 24,300-image test set (12,150), EuroSAT's and RESISC45's last 20% of 27,000 and
  31,500 (5,400 and 6,300), CLEVR's TFDS ``validation`` split (15,000). Every test size and class
  count below was checked against the ``expected_num_samples`` / ``num_classes`` lines of
  task_adaptation's ``data/<task>_test.py`` and against the ``test.txt`` lengths that
  BenediktAlkin/vtab1k-pytorch asserts on the NOAH release. They agree on all 19 but Caltech101:
  TFDS' test split holds 6,084 images, the NOAH release's ``test.txt`` 6,085 lines
  (``other_test_sizes``; ``data verify`` warns instead of failing on it).
* FGVC-5: VPT's splits (its README links the train/val/test JSON files and points to Table 8 of
  its appendix, Jia et al., ECCV 2022, arXiv:2203.12119, for their sizes): the public validation
  set where one exists (Flowers: 1,020/1,020/6,149, as TFDS has it), otherwise a split of the
  official training set. Class counts and test sizes match TFDS and task_adaptation (CUB 5,794,
  Dogs 8,580, Cars 8,041); the train/val sizes of CUB, NABirds, Dogs and Cars, and NABirds' test
  size, could not be checked against Table 8 here (no copy of it was reachable). Each train + val
  equals the official training set (5,994, 23,929, 12,000, 8,144) and NABirds' three splits sum
  to its 48,562 images.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyra_lightning.data.demo import DEMO_CLASSES, DEMO_SPLIT_SIZES, DEMO_TASK_NAME

GROUPS: tuple[str, ...] = ("natural", "specialized", "structured")
BENCHMARKS: tuple[str, ...] = ("vtab", "fgvc")
FGVC_GROUP = "fgvc"
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
        test_size: images in the test split of the standard release (``None``: not fixed).
        benchmark: ``"vtab"`` or ``"fgvc"`` (``"demo"`` for the generated task); task names are
            unique within a benchmark (FGVC's ``flowers`` is not VTAB's ``oxford_flowers102``).
        train_size, val_size: images in the training and validation splits (VTAB-1k: 800/200).
        other_test_sizes: test sizes of a widely used release that holds the same split but
            differs from ``test_size`` (e.g. one extra line); ``data verify`` warns on them.
    """

    name: str
    num_classes: int
    group: str
    aliases: tuple[str, ...] = ()
    test_size: int | None = None
    benchmark: str = "vtab"
    train_size: int = 800
    val_size: int = 200
    other_test_sizes: tuple[int, ...] = ()

    @property
    def split_sizes(self) -> dict[str, int | None]:
        """Expected images per split file of the task's layout, e.g. ``{"train800.txt": 800, ...}``."""
        if self.benchmark == "fgvc":
            return {"train.json": self.train_size, "val.json": self.val_size, "test.json": self.test_size}
        return {
            "train800.txt": self.train_size,
            "val200.txt": self.val_size,
            "train800val200.txt": self.train_size + self.val_size,
            "test.txt": self.test_size,
        }


# The paper's Table 2 order.
VTAB_TASKS: tuple[VTABTask, ...] = (
    VTABTask("cifar", 100, "natural", ("cifar100", "cifar_100"), test_size=10000),
    VTABTask(
        "caltech101", 102, "natural", ("caltech", "caltech_101"), test_size=6084, other_test_sizes=(6085,)
    ),
    VTABTask("dtd", 47, "natural", ("textures", "describable_textures"), test_size=1880),
    VTABTask(
        "oxford_flowers102",
        102,
        "natural",
        ("flowers102", "flowers", "oxford_flowers", "flowers_102"),
        test_size=6149,
    ),
    VTABTask(
        "oxford_iiit_pet",
        37,
        "natural",
        ("oxford_pet", "oxford_pets", "pets", "pet", "oxford_iiit_pets"),
        test_size=3669,
    ),
    VTABTask("svhn", 10, "natural", ("svhn_cropped",), test_size=26032),
    VTABTask("sun397", 397, "natural", ("sun", "sun_397"), test_size=21750),
    VTABTask("patch_camelyon", 2, "specialized", ("camelyon", "pcam", "patchcamelyon"), test_size=32768),
    VTABTask("eurosat", 10, "specialized", ("euro_sat",), test_size=5400),
    VTABTask("resisc45", 45, "specialized", ("resisc", "resisc_45"), test_size=6300),
    VTABTask(
        "diabetic_retinopathy",
        5,
        "specialized",
        ("retinopathy", "diabetic_retinopathy_detection"),
        test_size=42670,
    ),
    VTABTask("clevr_count", 8, "structured", ("clevr_counting", "clevr_count_all"), test_size=15000),
    VTABTask(
        "clevr_dist", 6, "structured", ("clevr_distance", "clevr_closest_object_distance"), test_size=15000
    ),
    VTABTask("dmlab", 6, "structured", ("dm_lab",), test_size=22735),
    VTABTask(
        "kitti",
        4,
        "structured",
        ("kitti_dist", "kitti_distance", "kitti_closest_vehicle_distance"),
        test_size=711,
    ),
    VTABTask(
        "dsprites_loc",
        16,
        "structured",
        ("dsprites_location", "dsprites_position", "dsprites_xpos"),
        test_size=73728,
    ),
    VTABTask("dsprites_ori", 16, "structured", ("dsprites_orientation",), test_size=73728),
    VTABTask("smallnorb_azi", 18, "structured", ("smallnorb_azimuth",), test_size=12150),
    VTABTask("smallnorb_ele", 9, "structured", ("smallnorb_elevation",), test_size=12150),
)
# VPT's FGVC splits (appendix Table 8 of arXiv:2203.12119): train / val / test images.
FGVC_TASKS: tuple[VTABTask, ...] = (
    VTABTask("cub", 200, FGVC_GROUP, ("cub200", "cub_200_2011", "cub2011"), 5794, "fgvc", 5394, 600),
    VTABTask("nabirds", 555, FGVC_GROUP, ("na_birds",), 24633, "fgvc", 21536, 2393),
    VTABTask("flowers", 102, FGVC_GROUP, ("oxford_flowers", "oxfordflowers"), 6149, "fgvc", 1020, 1020),
    VTABTask("dogs", 120, FGVC_GROUP, ("stanford_dogs", "stanforddogs"), 8580, "fgvc", 10800, 1200),
    VTABTask("cars", 196, FGVC_GROUP, ("stanford_cars", "stanfordcars"), 8041, "fgvc", 7329, 815),
)
DEMO_TASK = VTABTask(DEMO_TASK_NAME, len(DEMO_CLASSES), "demo", test_size=DEMO_SPLIT_SIZES["test"])


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


BENCHMARK_TASKS: dict[str, tuple[VTABTask, ...]] = {"vtab": VTAB_TASKS, "fgvc": FGVC_TASKS}
_LOOKUPS: dict[str, dict[str, VTABTask]] = {
    "vtab": _build_lookup((*VTAB_TASKS, DEMO_TASK)),
    "fgvc": _build_lookup((*FGVC_TASKS, DEMO_TASK)),
}
_LOOKUP = _LOOKUPS["vtab"]
# The groups each benchmark's table averages over, in print order: the report reads these (VTAB's
# Natural/Specialized/Structured means, and FGVC-5's one mean over its five tasks).
BENCHMARK_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "vtab": {group: tuple(t.name for t in VTAB_TASKS if t.group == group) for group in GROUPS},
    "fgvc": {FGVC_GROUP: tuple(t.name for t in FGVC_TASKS)},
}


def _known_names(benchmark: str = "vtab") -> str:
    return ", ".join(task.name for task in (*BENCHMARK_TASKS[benchmark], DEMO_TASK))


def check_benchmark(benchmark: str) -> str:
    """``benchmark`` itself, or a ValueError naming the known ones."""
    if benchmark not in BENCHMARK_TASKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of: {', '.join(BENCHMARK_TASKS)}")
    return benchmark


def benchmark_of_group(group: str | None) -> str:
    """The benchmark whose tasks carry ``group`` (``fgvc`` for FGVC-5, ``vtab`` otherwise)."""
    return "fgvc" if group == FGVC_GROUP else "vtab"


def resolve_task(name: str, benchmark: str = "vtab") -> VTABTask:
    """Look up a task of ``benchmark`` by its canonical name or any alias (case and ``-``/``_`` insensitive).

    Raises:
        ValueError: for a name that is neither a task of the benchmark nor ``demo``; the message lists them.
    """
    try:
        return _LOOKUPS[check_benchmark(benchmark)][_normalize_name(name)]
    except KeyError:
        title = "VTAB-1k" if benchmark == "vtab" else "FGVC"
        raise ValueError(
            f"unknown {title} task {name!r}; known tasks: {_known_names(benchmark)} (aliases such as "
            f"{'cifar100' if benchmark == 'vtab' else 'stanford_cars'!r} work too)"
        ) from None


def read_class_names(
    task_dir: Path, task: VTABTask | None, num_classes: int | None
) -> tuple[str, ...] | None:
    """Class names of a task, where it has them: the demo's shapes, or ``<task_dir>/classes.txt``.

    The VTAB-1k release ships labels as integers only; a ``classes.txt`` with one name per line
    (line ``i`` names label ``i``) gives ``predictions.csv`` readable names.

    Raises:
        ValueError: ``classes.txt`` does not list exactly ``num_classes`` names (``None``: any number).
    """
    if task is not None and task.name == DEMO_TASK_NAME:
        return DEMO_CLASSES
    path = Path(task_dir) / CLASS_NAMES_FILE
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{path}: lists {len(names)} class names, expected {num_classes} (one per line)")
    return names
