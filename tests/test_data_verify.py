"""``pyra-lightning data verify``: every check finds what it should, and bad input never crashes it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyra_lightning.__main__ import main
from pyra_lightning.data.manifest import data_identity
from pyra_lightning.data.tasks import FGVC_TASKS, VTAB_TASKS, resolve_task
from pyra_lightning.data.verify import JPEG_WARNING, verify


def _image(path: Path, seed: int, fmt: str = "PNG", mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)


def make_task(
    root: Path, name: str = "mytask", classes: int = 3, per_split: tuple = (6, 3, 4), fmt: str = "PNG"
) -> Path:
    """A small task in the VTAB-1k layout: train800 / val200 / their union / test, every class in train."""
    task = root / name
    lines: dict[str, list[str]] = {}
    seed = 0
    for split, count in zip(("train800", "val200", "test"), per_split, strict=True):
        lines[split] = []
        for index in range(count):
            rel = f"images/{split}/{index}.{'jpg' if fmt == 'JPEG' else 'png'}"
            _image(task / rel, seed, fmt)
            seed += 1
            lines[split].append(f"{rel} {index % classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, content in lines.items():
        (task / f"{split}.txt").write_text("\n".join(content) + "\n")
    return task


def run(root: Path, *extra: str) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["data", "verify", f"--root={root}", "--progress=false", "--workers=1", *extra])
    return int(exited.value.code or 0), out.getvalue()


def errors(root: Path, task: str = "mytask", **kwargs) -> list[str]:
    (report,) = verify(root, [task], progress=False, workers=1, **kwargs)
    return report.errors


def test_registry_holds_split_sizes_for_all_tasks() -> None:
    assert len(VTAB_TASKS) == 19 and all(t.test_size for t in VTAB_TASKS)
    assert resolve_task("svhn").split_sizes["test.txt"] == 26032
    assert resolve_task("kitti").test_size == 711 and resolve_task("dsprites_loc").test_size == 73728
    assert resolve_task("smallnorb_ele").split_sizes == {
        "train800.txt": 800,
        "val200.txt": 200,
        "train800val200.txt": 1000,
        "test.txt": 12150,
    }
    assert [t.name for t in FGVC_TASKS] == ["cub", "nabirds", "flowers", "dogs", "cars"]
    assert resolve_task("flowers", "fgvc").benchmark == "fgvc"  # not VTAB's oxford_flowers102
    assert resolve_task("flowers").name == "oxford_flowers102"


def test_clean_install_passes_and_writes_a_manifest(tmp_path: Path) -> None:
    make_task(tmp_path)
    code, out = run(tmp_path, "--task", "mytask")
    assert code == 0, out
    assert "mytask" in out and "6/3/9/4" in out and "PNG" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["tasks"]["mytask"]
    assert entry["counts"]["train800val200.txt"] == 9
    assert entry["histograms"]["train800.txt"] == [2, 2, 2]
    assert len(entry["files"]) == 13 and all(len(f["sha256"]) == 64 for f in entry["files"].values())
    identity, stale = data_identity(tmp_path, "mytask")
    assert stale is None and entry["errors"] == 0
    assert identity is not None and identity["digest"] == entry["digest"] and identity["formats"] == ["PNG"]


def test_a_digest_is_claimed_only_for_the_data_a_run_read(tmp_path: Path) -> None:
    """results.json's data digest: not from a failed check, nor for split files or images that
    changed since the check."""
    from pyra_lightning.data.layouts import LAYOUTS, read_layout_split

    task = make_task(tmp_path)
    assert run(tmp_path, "--task", "mytask")[0] == 0

    def read() -> dict:
        return {
            name: read_layout_split(LAYOUTS["vtab"], task, name, 3) for name in ("train800.txt", "test.txt")
        }

    identity, stale = data_identity(tmp_path, "mytask", task, read())
    assert identity is not None and stale is None
    lines = (task / "test.txt").read_text().splitlines()
    (task / "test.txt").write_text("\n".join(lines[:-1]) + "\n")  # one test image fewer
    identity, stale = data_identity(tmp_path, "mytask", task, read())
    assert identity is None and "mytask/test.txt has 3 images, the manifest 4" in stale
    (task / "test.txt").write_text("\n".join(lines) + "\n")
    image = task / lines[0].split()[0]
    image.write_bytes(image.read_bytes() + b"\0")  # another file under the same name
    identity, stale = data_identity(tmp_path, "mytask", task, read())
    assert identity is None and "is not the file the manifest describes" in stale

    bad = [*lines[:-1], lines[-1].rsplit(" ", 1)[0] + " 7"]  # a label out of range: a failed check
    (task / "test.txt").write_text("\n".join(bad) + "\n")
    assert run(tmp_path, "--task", "mytask")[0] != 0
    identity, stale = data_identity(tmp_path, "mytask")
    assert identity is None and "found 1 error(s)" in stale


def test_label_out_of_range_names_file_and_line(tmp_path: Path) -> None:
    task = make_task(tmp_path, "svhn", classes=10)
    text = (task / "test.txt").read_text().splitlines()
    text[2] = text[2].rsplit(" ", 1)[0] + " 10"
    (task / "test.txt").write_text("\n".join(text) + "\n")
    found = errors(tmp_path, "svhn")
    assert "svhn/test.txt:3: label 10 out of range for 10 classes" in found
    assert "svhn/train800.txt: 6 images, expected 800" in found  # counts follow the registry
    assert "svhn/train800val200.txt: 4 of 10 classes never occur (6, 7, 8, 9)" in found


def test_a_blank_line_in_a_split_file_is_named_by_its_line(tmp_path: Path) -> None:
    """A deleted entry leaves a blank line; it is named, not only seen as a count one short."""
    task = make_task(tmp_path, "svhn", classes=10)
    lines = (task / "test.txt").read_text().splitlines()
    (task / "test.txt").write_text("\n".join(["", lines[0], "  ", *lines[2:]]) + "\n\n")  # trailing: fine
    found = [e for e in errors(tmp_path, "svhn") if e.startswith("svhn/test.txt")]
    assert found == [
        "svhn/test.txt: lines 1 and 3 are blank; expected '<image path> <integer label>' on every line"
    ]
    (task / "test.txt").write_text("\n".join([lines[0], "", *lines[2:]]) + "\n")
    found = [e for e in errors(tmp_path, "svhn") if e.startswith("svhn/test.txt")]
    assert found == ["svhn/test.txt:2: blank line; expected '<image path> <integer label>' on every line"]


def test_a_known_other_release_size_warns_and_any_other_size_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyra_lightning.data.verify as verify_module
    from pyra_lightning.data.tasks import VTABTask

    make_task(tmp_path)  # test.txt: 4 images
    # The registry's Caltech101 case in miniature: the split has 3 images, a known release 4.
    task = VTABTask("mytask", 3, "natural", test_size=3, train_size=6, val_size=3, other_test_sizes=(4,))
    monkeypatch.setattr(verify_module, "resolve_task", lambda name, benchmark="vtab": task)
    (report,) = verify_module.verify(tmp_path, ["mytask"], progress=False, workers=1)
    assert report.errors == []
    assert any("mytask/test.txt: 4 images where the registry's split has 3" in w for w in report.warnings)
    monkeypatch.setattr(
        verify_module,
        "resolve_task",
        lambda name, benchmark="vtab": dataclasses.replace(task, other_test_sizes=()),
    )
    (report,) = verify_module.verify(tmp_path, ["mytask"], progress=False, workers=1)
    assert "mytask/test.txt: 4 images, expected 3" in report.errors
    assert resolve_task("caltech101").other_test_sizes == (6085,)


def test_missing_task_folder_and_empty_split_file(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    (task / "val200.txt").write_text("")
    found = errors(tmp_path)
    assert "mytask/val200.txt: split file lists no images" in found
    assert any("train800val200.txt: is not train800.txt + val200.txt" in e for e in found)
    code, out = run(tmp_path, "--task", "cifar")
    assert code == 1 and "cifar: task folder missing" in out and "Traceback" not in out


def test_unreadable_cmyk_and_16bit_images(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    (task / "images/test/0.png").write_bytes(b"not an image")
    _image(task / "images/test/1.png", 99, "PNG", "I;16")
    (task / "images/test/2.png").unlink()
    _image(task / "images/test/3.png", 98, "JPEG", "CMYK")  # a CMYK JPEG named .png
    (report,) = verify(tmp_path, ["mytask"], progress=False, workers=1)
    joined = "\n".join(report.errors)
    assert "mytask/test.txt:1: image images/test/0.png cannot be decoded" in joined
    assert "mytask/test.txt:2: image images/test/1.png has mode I;16" in joined
    assert "mytask/test.txt:3: image images/test/2.png does not exist" in joined
    assert any("test.txt:4: image images/test/3.png is CMYK" in w for w in report.warnings)
    assert any(JPEG_WARNING in w for w in report.warnings)


def test_an_empty_or_undecodable_image_is_named_not_shown_as_a_buffer(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    (task / "images/test/0.png").write_bytes(b"")
    (task / "images/test/1.png").write_bytes(b"GIF87 but not really")
    png = (task / "images/test/2.png").read_bytes()
    (task / "images/test/2.png").write_bytes(png[: len(png) // 2])
    found = errors(tmp_path)
    assert found[0] == "mytask/test.txt:1: image images/test/0.png is empty (0 bytes)"
    assert found[1].startswith(
        "mytask/test.txt:2: image images/test/1.png cannot be decoded: its 20 bytes are in no image format"
    )
    assert found[2].startswith("mytask/test.txt:3: image images/test/2.png cannot be decoded")
    assert "truncated" in found[2]
    assert len(found) == 3 and not any("BytesIO" in e or "_io." in e for e in found)


def test_jpeg_is_a_warning_naming_prepare(tmp_path: Path) -> None:
    make_task(tmp_path, fmt="JPEG")
    code, out = run(tmp_path, "--task", "mytask")
    assert code == 0
    assert "adapter_plus issue 3" in out and "data prepare vtab" in out and "JPEG" in out


def test_symlinked_image_folder_is_followed_and_a_broken_one_reported(tmp_path: Path) -> None:
    task = make_task(tmp_path / "real")
    shutil.move(str(task / "images"), tmp_path / "elsewhere")
    (task / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert errors(tmp_path / "real") == []
    (tmp_path / "elsewhere").rename(tmp_path / "gone")
    found = errors(tmp_path / "real")
    assert len(found) == 6 and all("does not exist" in e for e in found[:5])
    assert found[5].startswith("mytask: 13 of 13 images do not exist (5 listed above)")


def test_training_image_repeated_in_test_is_found_by_content(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    shutil.copy(task / "images/train800/2.png", task / "images/test/3.png")
    found = errors(tmp_path)
    assert found == [
        "mytask/test.txt:4: image images/test/3.png has the same content as "
        "mytask/train800.txt:3 images/train800/2.png (a training image in the test split)"
    ]
    assert errors(tmp_path, duplicates=False) == []
    assert errors(tmp_path, hashes=False) == found  # hashed only as size candidates


def test_overlapping_train_and_val_and_missing_class(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    train = (task / "train800.txt").read_text().splitlines()
    (task / "val200.txt").write_text("\n".join([train[0], train[1]]) + "\n")
    (task / "train800val200.txt").write_text("\n".join(train) + "\n")
    found = errors(tmp_path)
    assert any("val200" in e and "shares 2 image(s)" in e for e in found)
    classes = [line for line in train if not line.endswith(" 2")]
    for split in ("train800", "train800val200"):
        (task / f"{split}.txt").write_text("\n".join(classes) + "\n")
    (task / "classes.txt").write_text("a\nb\nc\n")
    assert any("1 of 3 classes never occur (2)" in e for e in errors(tmp_path))


def test_a_label_that_differs_between_split_files_is_one_line_naming_both(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    union = (task / "train800val200.txt").read_text().splitlines()
    union[1] = "images/train800/1.png 2"  # train800.txt:2 gives it label 1
    (task / "train800val200.txt").write_text("\n".join(union) + "\n")
    assert errors(tmp_path) == [
        "mytask/train800val200.txt:2: images/train800/1.png has label 2, but mytask/train800.txt:2 gives it label 1"
    ]
    relabelled = [f"{line.rsplit(' ', 1)[0]} {(int(line[-1]) + 1) % 3}" for line in union]
    (task / "train800val200.txt").write_text("\n".join(relabelled) + "\n")
    assert errors(tmp_path) == [
        "mytask/train800val200.txt:1: images/train800/0.png has label 1, but mytask/train800.txt:1 gives it "
        "label 0 (9 images in all are labelled differently here than in train800.txt or val200.txt)"
    ]
    (task / "train800val200.txt").write_text("\n".join([*union[2:], "images/other.png 0"]) + "\n")
    _image(task / "images/other.png", 77)
    assert errors(tmp_path) == [
        "mytask/train800val200.txt: is not train800.txt + val200.txt (1 image(s) only in it, e.g. "
        "images/other.png; 2 image(s) of train800.txt or val200.txt missing from it, e.g. "
        "images/train800/0.png of train800.txt)"
    ]


def test_against_tells_two_installs_apart(tmp_path: Path) -> None:
    make_task(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert run(tmp_path / "a", "--task", "mytask")[0] == 0
    code, out = run(tmp_path / "b", "--task", "mytask", f"--against={tmp_path / 'a/manifest.json'}")
    assert code == 0 and "0 difference(s)" in out
    _image(tmp_path / "b/mytask/images/test/1.png", 1234)
    code, out = run(tmp_path / "b", "--task", "mytask", f"--against={tmp_path / 'a/manifest.json'}")
    assert code == 1 and "mytask/images/test/1.png" in out


def test_fgvc_layout_is_verified_against_the_registry(tmp_path: Path) -> None:
    task = tmp_path / "cub"
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        mapping = {}
        for index in range(count):
            _image(task / f"images/{split}_{index}.jpg", index + 10 * len(split), "JPEG")
            mapping[f"{split}_{index}.jpg"] = 1 + index % 2  # VPT's class ids need not start at 0
        (task / f"{split}.json").write_text(json.dumps(mapping))
    (report,) = verify(tmp_path, ["cub"], benchmark="fgvc", progress=False, workers=1)
    assert report.counts == {"train.json": 6, "val.json": 2, "test.json": 3}
    assert "cub/train.json: 6 images, expected 5394" in report.errors
    assert "cub/test.json: 3 images, expected 5794" in report.errors
    assert any("198 of 200 classes never occur" in e for e in report.errors)
    assert report.formats == {"JPEG": 11}
    assert not any("JPEG" in w for w in report.warnings), "FGVC's originals are JPEG: nothing to rebuild"


def test_a_wrong_fgvc_image_folder_lists_five_images_and_one_summary(tmp_path: Path) -> None:
    task = tmp_path / "cub"
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        mapping = {f"{split}_{index}.jpg": 1 + index % 2 for index in range(count)}
        for index, name in enumerate(mapping):
            _image(task / "imgs" / name, index + 10 * len(split), "JPEG")  # VPT's is images/
        (task / f"{split}.json").write_text(json.dumps(mapping))
    (report,) = verify(tmp_path, ["cub"], benchmark="fgvc", progress=False, workers=1)
    missing = [e for e in report.errors if "not exist" in e]
    assert len(missing) == 6 and missing[0] == "cub/train.json:1: image images/train_0.jpg does not exist"
    assert missing[5] == (
        f"cub: 11 of 11 images do not exist (5 listed above); the split files' paths are read relative to "
        f"cub/images (VPT's image folder for cub), e.g. {task / 'images/train_0.jpg'}; cub/imgs/train_0.jpg "
        "exists instead: move the contents of cub/imgs into cub/images"
    )


def test_missing_images_of_a_vtab_task_end_in_a_summary(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    (task / "images").rename(task / "pictures")
    found = errors(tmp_path)
    assert len(found) == 6 and found[-1].startswith(
        "mytask: 13 of 13 images do not exist (5 listed above); the split files' paths are read relative "
        f"to mytask (the task folder), e.g. {task / 'images/train800/0.png'}"
    )
    assert found[-1].endswith(
        "; mytask/pictures/train800/0.png exists instead: move the contents of mytask/pictures into mytask/images"
    )


def _result(
    tmp_path: Path, seed: int, digest: str | None, task: str = "cifar", group: str | None = None
) -> dict:
    from pyra_lightning.results import RunResult, read_result

    data = {"manifest": "m.json", "digest": digest, "formats": ["PNG"]} if digest else None
    settings = {"data.task": task, "model.lora.rank": 8, "seed_everything": seed}
    path = tmp_path / f"{task}{seed}.json"
    RunResult(
        task=task, method="pyra", test_acc=0.5, protocol="final", group=group, settings=settings, data=data
    ).write(path)
    return {**read_result(path), "results_file": str(path)}


def test_report_refuses_to_average_runs_on_different_data(tmp_path: Path) -> None:
    from pyra_lightning.commands.table import build_table

    same = [_result(tmp_path, 0, "a" * 64), _result(tmp_path, 1, "a" * 64), _result(tmp_path, 2, None)]
    assert build_table(same)[0].tasks["cifar"].acc == pytest.approx(50.0)
    with pytest.raises(ValueError, match=r"cifar0\.json and .*cifar3\.json were trained on different data"):
        build_table([*same, _result(tmp_path, 3, "b" * 64)])


def test_fgvc_results_keep_their_benchmark() -> None:
    from pyra_lightning.results import validate_result

    checked = validate_result({"task": "stanford_cars", "group": "fgvc", "method": "pyra", "test_acc": 0.8})
    assert checked["task"] == "cars" and checked["group"] == "fgvc"
    assert (
        validate_result({"task": "flowers", "method": "pyra", "test_acc": 0.8})["task"] == "oxford_flowers102"
    )


def test_the_data_module_claims_the_digest_of_what_it_read(tmp_path: Path) -> None:
    """The path a fit takes: VTABDataModule.data_identity (results.json's ``data``) after setup."""
    from pyra_lightning.data import VTABDataModule, generate_demo

    task = generate_demo(tmp_path)
    assert run(tmp_path, "--task", "demo")[0] == 0
    module = VTABDataModule(root=str(tmp_path), task="demo", img_size=32, batch_size=8, num_workers=0)
    module.setup("fit")
    assert module.data_identity is not None

    lines = (task / "test.txt").read_text().splitlines()
    (task / "test.txt").write_text("\n".join(lines[:-1]) + "\n")  # changed since the check
    module = VTABDataModule(root=str(tmp_path), task="demo", img_size=32, batch_size=8, num_workers=0)
    module.setup("fit")
    with pytest.warns(
        UserWarning, match="results.json records no data digest: .*demo/test.txt has 399 images"
    ):
        assert module.data_identity is None


def test_a_missing_root_is_refused_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-root"
    code, _ = run(missing)
    assert code == 2
    assert f"--root {missing} (absolute: {missing}) is not a folder" in capsys.readouterr().err
    assert not missing.exists(), "no folder, no manifest.json written into it"
