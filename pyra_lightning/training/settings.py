"""The classifier's settings in the groups a user thinks in: LoRA, merging, optimisation, recipe.

``PyraClassifier`` takes the backbone's arguments flat (timm's names: ``model_name``,
``img_size``, ``drop_path_rate``, ...) and everything else in four small frozen dataclasses, so a
config reads

.. code-block:: yaml

    model:
      model_name: vit_base_patch16_224.orig_in21k
      lora: {rank: 8, dropout: 0.1}
      merging: {merge_r: low, pyra: true}
      optim: {lr: 0.001, warmup_epochs: 10}
      recipe: {scheduler_step: paper}

and every field is also a flag (``--model.lora.rank 16``, ``--model.merging.merge_r high``).
LightningCLI (through jsonargparse) merges groups key by key, so a second config or a flag
changes one field and keeps the others.

The module keeps the groups in ``hparams`` as plain dicts (``hparams.yaml``, checkpoints and the
run identity stay plain data); ``coerce`` turns such a dict back into its dataclass, which is how
a checkpoint's ``hyper_parameters`` rebuild the module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar

from pyra_lightning.lora import LoRAInit
from pyra_lightning.modulation import Variant
from pyra_lightning.schedules import MergeArg

SchedulerStep = Literal["paper", "reference"]
DistilledTraining = Literal["average", "class_head"]


class ElasticRange(TypedDict, total=False):
    """``model.merging.elastic`` as configs and the command line give it (every key optional).

    Attributes:
        min_fraction: Fastest point, as a fraction of the uncompressed model's FLOPs (0.289, the
            paper's ``high``).
        max_fraction: Gentlest point (1.0: the uncompressed model).
        sandwich: Also train the fastest schedule every step (the sandwich rule); off trains the
            drawn schedule only.
        include_full: Also train the uncompressed model every step (costs one more full pass).
        curve: Points ``test`` evaluates: FLOPs fractions and/or ``"low"``/``"high"``; empty means
            the default (``max_fraction``, ``low``, ``high`` and the two midpoints between them,
            those inside the range).
    """

    min_fraction: float
    max_fraction: float
    sandwich: bool
    include_full: bool
    curve: list[float | str]


@dataclass(frozen=True)
class LoRASettings:
    """``model.lora``: the parameter-efficient method on the frozen projections (eq. 1).

    Attributes:
        rank: LoRA rank (8 for ViT-B and 12 for ViT-L in the paper); 0 trains no LoRA.
        alpha: Scale numerator; ``None`` is a scale of 1, as the reference trains.
        dropout: Dropout on the LoRA branch input.
        method: A name registered in ``pyra_lightning.peft``: ``"lora"`` (eq. 1) or ``"dora"``
            (weight-decomposed LoRA); both fold into the weight.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.1
    method: str = "lora"


@dataclass(frozen=True)
class MergingSettings:
    """``model.merging``: which tokens merge, and how (ToMe eqs. 2-3, PYRA eqs. 4-7).

    Attributes:
        merge_r: Token merging schedule (``"low"``, ``"high"``, int, per-layer list, FLOPs
            fraction); ``None`` disables merging (the PEFT baseline).
        pyra: PYRA modulation (``True``), plain ToMe (``False``) or an ablation variant name.
        prop_attn: Proportional attention (``log(size)`` added to attention logits).
        matcher: Which tokens merge, a name registered in ``pyra_lightning.merge_rules``
            (``"bipartite"``: ToMe's bipartite soft matching, eqs. 2-3; ``"triton"``: the same
            with its scores' row maxima in one Triton kernel on CUDA).
        merger: How matched tokens combine, a name registered there (``"wavg"``: the
            size-weighted average with PYRA's modulation; ``"triton"``: the same in two Triton
            kernels on CUDA, training too, with a backward of its own: ``kernels.merge_grad``'s
            kernels eager, the torch formula under ``torch.compile``).
        attention: The kernel proportional attention runs on, a name registered in
            ``pyra_lightning.kernels.attention`` (``"sdpa"``: SDPA with a ``log(size)`` mask;
            ``"flex"``: FlexAttention with a ``score_mod``, fused under ``torch.compile``;
            ``"triton"``: a Triton flash-attention kernel that reads the sizes per key, for
            inference on CUDA, SDPA elsewhere; ``"sdpa_channel"``: SDPA with no mask, ``log(size)``
            in one more key channel, so flash attention may run forward and backward). The same
            function each way; which is faster is measured per GPU.
        elastic: Train one model for a range of merge rates instead of the one ``merge_r``
            (``training.elastic``): ``{min_fraction: 0.289, max_fraction: 1.0, sandwich: true,
            include_full: false, curve: []}``, FLOPs fractions of the uncompressed model; every key
            is optional. ``merge_r`` is then the nominal schedule (validation, ``test_acc``), inside
            the range; ``test`` also evaluates the ``curve`` points. ``None``: a plain run.
    """

    merge_r: MergeArg = "low"
    pyra: bool | Variant = True
    prop_attn: bool = True
    matcher: str = "bipartite"
    merger: str = "wavg"
    attention: str = "sdpa"
    elastic: ElasticRange | None = None


@dataclass(frozen=True)
class OptimSettings:
    """``model.optim``: AdamW, its warm-up + cosine schedule (timm's, per epoch) and the loss.

    Attributes:
        lr: Learning rate of LoRA and head.
        pyra_lr: Learning rate of PYRA's parameters; ``None`` uses ``lr``. The reference script
            has a ``--pyra_lr`` flag (1e-4 in its scripts), but its optimizer factory gives that
            rate only to parameters whose names contain ``ssf``, so its published numbers train
            PYRA at the main rate, with weight decay on PYRA's matrices; ``None`` does the same
            and is the default of both recipes.
        weight_decay: AdamW decay on matrices (norms and biases get none).
        warmup_epochs: Linear warm-up from ``warmup_lr``.
        warmup_lr: Learning rate at the first warm-up epoch.
        min_lr: Floor of the cosine schedule.
        label_smoothing: Cross-entropy label smoothing.
    """

    lr: float = 1e-3
    pyra_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class RecipeSettings:
    """``model.recipe``: where the paper's recipe and the reference's ``train.py`` differ.

    The defaults are the paper's; ``configs/recipe/reference.yaml`` sets the three to
    ``"reference"``, ``"reference"`` and ``"class_head"`` to retrace the reference instead.

    Attributes:
        scheduler_step: When the per-epoch cosine schedule advances. ``"paper"``: epoch ``e``
            trains at ``lr(e)`` of timm's cosine-with-warm-up (``step(e + 1)`` after epoch ``e``).
            ``"reference"``: ``step(e)`` after epoch ``e``, as the reference's ``train.py`` calls
            it, so epochs 0 and 1 both train at ``warmup_lr`` and epoch ``e >= 1`` at
            ``lr(e - 1)``: the whole schedule one epoch late.
        lora_init: ``"kaiming"`` (A kaiming-uniform, B = 0: training starts from the pretrained
            model) or ``"reference"`` (A and B ``trunc_normal(std=0.02)``, B·A != 0 at step 0, as
            the reference's ``init_weights`` leaves them); see ``LoRALinear.reset_lora_parameters``.
        distilled_training: For distilled DeiT (two heads). ``"average"``: the loss is taken on
            the mean of ``head`` and ``head_dist``, the same output that is evaluated.
            ``"class_head"``: as the reference trains, the loss uses ``head`` only; ``head_dist``
            is frozen at ``nn.Linear``'s default init (the reference's ``reset_classifier``
            recreates it without re-initialising it, and it never receives a gradient), yet
            evaluation still averages both heads. It is saved in checkpoints like a trained
            tensor. Models without a distillation head ignore it.
    """

    scheduler_step: SchedulerStep = "paper"
    lora_init: LoRAInit = "kaiming"
    distilled_training: DistilledTraining = "average"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("scheduler_step", ("paper", "reference")),
            ("lora_init", ("kaiming", "reference")),
            ("distilled_training", ("average", "class_head")),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"model.recipe.{name} must be one of {list(allowed)}, got {value!r}")


# The groups by their key under ``model``: the run identity flattens them to ``model.<group>.<field>``.
GROUPS: dict[str, type] = {
    "lora": LoRASettings,
    "merging": MergingSettings,
    "optim": OptimSettings,
    "recipe": RecipeSettings,
}
Settings = TypeVar("Settings")


def coerce(kind: type[Settings], value: Settings | dict[str, Any] | None, group: str) -> Settings:
    """``value`` as a ``kind``: a dataclass as given, a dict (a checkpoint's, a script's) checked.

    Raises:
        ValueError: a dict key that is not a field of the group, naming the group and its fields.
    """
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"model.{group}: expected a mapping of {kind.__name__}'s fields, got {value!r}")
    fields = [f.name for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"model.{group}: unknown key(s) {unknown}; expected some of {fields}")
    return kind(**value)


def as_dict(value: Any) -> dict[str, Any]:
    """A group as the plain dict that ``hparams``, checkpoints and ``hparams.yaml`` hold."""
    return dataclasses.asdict(value)


# The flat names of the versions before the groups: a checkpoint holding them is refused
# with one line instead of failing inside Lightning or the constructor.
FLAT_NAMES: dict[str, str] = {
    f"{prefix}{field}" if prefix else field: f"{group}.{field}"
    for group, kind in GROUPS.items()
    for field in (f.name for f in dataclasses.fields(kind))
    if (group, field) != ("lora", "method")
    for prefix in (("lora_",) if group == "lora" else ("",))
} | {"peft": "lora.method"}


def refuse_flat(hparams: dict[str, Any], source: object) -> None:
    """Refuse hyperparameters written before the setting groups (``lora_rank``, ``merge_r``, ...).

    Raises:
        ValueError: naming the file, its flat keys and their grouped names.
    """
    flat = [name for name in FLAT_NAMES if name in hparams and not isinstance(hparams.get(name), dict)]
    if flat:
        renamed = ", ".join(f"{name} -> model.{FLAT_NAMES[name]}" for name in flat[:4])
        raise ValueError(
            f"{source} was written by an earlier pyra-lightning, with flat model settings ({renamed}"
            f"{', ...' if len(flat) > 4 else ''}); this version groups them. Retrain it, or load it with the version that wrote it"
        )
