"""How a fit ends: what counts as finished (``run_folder.fit_completed``), and what ``results.json``
keeps of the periodic test evaluations (``data.track_test``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import quickstart_args, tiny_module
from lightning.pytorch.callbacks import EarlyStopping, Timer

from pyra_lightning.training.cli import main
from pyra_lightning.training.run_folder import fit_completed


def trainer(
    epoch: int, step: int, should_stop: bool, *callbacks: object, max_steps: int = -1
) -> SimpleNamespace:
    return SimpleNamespace(
        max_epochs=3, current_epoch=epoch, max_steps=max_steps, global_step=step, should_stop=should_stop,
        callbacks=list(callbacks),
    )  # fmt: skip


def test_a_max_time_or_max_steps_stop_is_not_a_finished_run_and_early_stopping_is() -> None:
    """``max_time`` was counted as finished: the run was marked so, and a rerun with more time
    said 'Nothing to do' after 3 of 50 epochs."""
    timer = Timer(duration="00:00:00:01")
    timer._start_time["train"], timer._end_time["train"] = 0.0, 5.0  # 5 s elapsed of 1
    assert timer.time_remaining() is not None and timer.time_remaining() <= 0
    assert not fit_completed(trainer(1, 6, True, timer))  # type: ignore[arg-type]
    assert not fit_completed(trainer(1, 6, True, max_steps=6))  # type: ignore[arg-type]
    assert fit_completed(trainer(1, 6, True, EarlyStopping(monitor="val/acc")))  # type: ignore[arg-type]
    assert fit_completed(trainer(3, 12, False, Timer(duration="00:01:00:00")))  # type: ignore[arg-type]
    assert fit_completed(trainer(3, 12, True, timer)), "all epochs ran before the time was up"  # type: ignore[arg-type]


@pytest.mark.slow
def test_track_test_writes_the_best_periodic_test_accuracy_to_results(tmp_path: Path) -> None:
    """``test_acc_best`` was always null: the fit's ``trainer.test`` clears the logged metric."""
    run = tmp_path / "run"
    limits = (
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=2",
    )
    main(
        [
            "fit",
            *quickstart_args(
                run, tmp_path / "data", "--trainer.max_epochs=2", "--data.track_test=true", *limits
            ),
        ]
    )
    with (run / "metrics.csv").open(newline="") as handle:
        logged = [float(r["test/acc_best"]) for r in csv.DictReader(handle) if r.get("test/acc_best")]
    assert len(logged) == 2
    assert json.loads((run / "results.json").read_text())["test_acc_best"] == pytest.approx(max(logged))


def test_the_best_periodic_test_accuracy_survives_a_resume() -> None:
    """torchmetrics keeps no state in ``state_dict``: the checkpoint carries the best so far."""
    module = tiny_module()
    module.val_test_acc_best.update(torch.tensor(0.5))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["test_acc_best"] == 0.5
    resumed = tiny_module()
    assert resumed.test_acc_best is None
    resumed.on_load_checkpoint(checkpoint)
    resumed.val_test_acc_best.update(torch.tensor(0.25))  # a worse epoch after the resume
    assert resumed.test_acc_best == 0.5


def test_batch_limits_are_settings_when_set_and_a_full_run_keeps_its_identity() -> None:
    """A fit on 3 batches was taken for the full run of the same flags ('Nothing to do'), and
    ``report`` counted the two as one run tested twice."""
    from pyra_lightning.training.runs import TRAINER_LIMITS, run_settings

    module = tiny_module()
    full = SimpleNamespace(precision="32-true", **dict.fromkeys(("max_epochs",), 3), **TRAINER_LIMITS)
    short = SimpleNamespace(**{**vars(full), "limit_train_batches": 3, "limit_test_batches": 0.5})
    settings_full = run_settings(full, module, None)  # type: ignore[arg-type]
    settings_short = run_settings(short, module, None)  # type: ignore[arg-type]
    assert not any(key.startswith("trainer.limit_") or "overfit" in key for key in settings_full)
    assert settings_short["trainer.limit_train_batches"] == 3
    assert settings_short["trainer.limit_test_batches"] == 0.5
    assert "trainer.limit_val_batches" not in settings_short


def test_only_a_job_limit_inside_an_epoch_holds_back_the_epoch_end_checkpoint() -> None:
    from pyra_lightning.training.checkpointing import stopped_inside_epoch

    def inside(last_batch: bool, *callbacks: object, max_steps: int = -1) -> bool:
        fake = trainer(1, 6, True, *callbacks, max_steps=max_steps)
        fake.sanity_checking = False
        fake.fit_loop = SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(is_last_batch=last_batch))
        )
        return stopped_inside_epoch(fake)  # type: ignore[arg-type]

    timer = Timer(duration="00:00:00:01")
    timer._start_time["train"], timer._end_time["train"] = 0.0, 5.0
    assert inside(False, max_steps=6) and inside(False, timer)
    assert not inside(True, max_steps=6), "a stop on the epoch's last batch keeps its checkpoint"
    assert not inside(False, EarlyStopping(monitor="val/acc")), (
        "EarlyStopping inside an epoch is not a job limit"
    )


@pytest.mark.parametrize(
    "limits",
    [
        ("--trainer.max_epochs=-1", "--trainer.max_steps=3"),
        ("--trainer.max_epochs=null", "--trainer.max_time=00:00:01:00"),
    ],
)
def test_a_fit_without_a_number_of_epochs_is_refused_before_it_trains(
    tmp_path: Path, limits: tuple[str, str]
) -> None:
    """The cosine schedule fell back to 100 epochs whatever the run's length, and a step-bounded run
    never counted as finished (``max_steps`` is a job limit), so every rerun trained again."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"trainer.max_epochs is (-1|None): .*--trainer.max_epochs N"):
        main(["fit", *quickstart_args(run, tmp_path / "data", *limits)])
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def test_the_schedule_length_is_max_epochs() -> None:
    from pyra_lightning.training.module import schedule_epochs

    assert schedule_epochs(SimpleNamespace(max_epochs=7)) == 7  # type: ignore[arg-type]
    assert schedule_epochs(None) == 100
    with pytest.raises(ValueError, match="max_epochs is None"):
        schedule_epochs(SimpleNamespace(max_epochs=None))  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_job_limit_stop_is_not_tested_and_the_rerun_finishes_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fit stopped by ``max_steps`` tested its partial model and wrote ``results.json``, which
    ``report`` then read as the run's result while ``run.json`` still said ``running``."""
    run, data = tmp_path / "run", tmp_path / "data"
    short = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    short += ("--trainer.limit_test_batches=1", "--trainer.num_sanity_val_steps=0")
    main(["fit", *quickstart_args(run, data, *short, "--trainer.max_steps=2")])  # after epoch 0 of 2
    assert not (run / "results.json").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert "--trainer.max_steps 2 stopped training at epoch 1, step 2" in caplog.text
    assert "not tested, no results.json" in caplog.text
    main(["fit", *quickstart_args(run, data, *short)])
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "results.json").read_text())["test_acc"] is not None
