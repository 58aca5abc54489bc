"""Lightning's debugging flags leave the run folder alone (``training.run_folder``).

A ``--trainer.fast_dev_run`` pass wrote a one-batch test accuracy as the run's ``results.json``
and marked the folder ``finished``: the real ``fit`` after it trained nothing ("Nothing to do")
and ``report`` would have tabulated the debug pass.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from helpers import quickstart_args

from pyra_lightning.training.cli import main
from pyra_lightning.training.run_folder import scratch_run_dir

SHORT = ("--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2")


@pytest.mark.slow
def test_a_fast_dev_run_writes_to_a_scratch_folder_and_the_real_fit_then_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the scratch folder's parent
    (tmp_path / "tmp").mkdir()
    scratch = scratch_run_dir(run)
    (scratch / "checkpoints").mkdir(parents=True, exist_ok=True)
    (scratch / "run.json").write_text("{not json")  # a stale scratch folder is emptied first

    main(["fit", *quickstart_args(run, data, "--trainer.fast_dev_run=true")])
    assert not run.exists(), "the debug pass wrote into the run folder"
    assert scratch.parent == tmp_path / "tmp"
    debug = json.loads((scratch / "results.json").read_text())  # every step ran, in the scratch folder
    assert debug["checkpoint"] is None or str(scratch) in debug["checkpoint"]
    assert json.loads((scratch / "run.json").read_text())["status"] == "finished"

    main(["fit", *quickstart_args(run, data, "--trainer.max_epochs=1", *SHORT)])
    out = capsys.readouterr().out
    assert "Nothing to do" not in out, "the real fit found the debug pass's 'finished' run"
    result = (run / "results.json").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"

    # an evaluation's debug pass reads the run's checkpoint and leaves its results alone
    config = f"--config={run / 'config.yaml'}"
    main(["test", config, "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])
    assert (run / "results.json").read_text() == result
    tested = json.loads((scratch / "test" / "results.json").read_text())  # `test` logs into <run>/test/
    assert tested["checkpoint"] == str(run / "checkpoints" / "last.ckpt")


def test_barebones_is_refused_before_the_run_folder_exists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(
        ValueError, match=r"--trainer.barebones true turns off .* `pyra-lightning benchmark --train`"
    ):
        main(["fit", *quickstart_args(run, tmp_path / "data", "--trainer.barebones=true")])
    assert not run.exists()


def test_scratch_folders_are_one_per_run_folder(tmp_path: Path) -> None:
    assert scratch_run_dir(tmp_path / "a") == scratch_run_dir(tmp_path / "a")
    assert scratch_run_dir(tmp_path / "a") != scratch_run_dir(tmp_path / "b")
    assert scratch_run_dir(tmp_path / "a").name.startswith("pyra-lightning-fast_dev_run-")
