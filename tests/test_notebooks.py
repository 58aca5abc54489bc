"""The notebooks run top to bottom on CPU, are stored without outputs, and their helpers work.

Executing a notebook takes tens of seconds (a kernel, a few hundred training steps of a tiny ViT),
so those tests carry the ``slow`` marker: ``pytest -m "not slow"`` leaves them out.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import tiny_vit

from pyra_lightning import apply_merging
from pyra_lightning.visualize import layer_sources, merge_overlay, patch_groups, plot_merge_layers

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_merge_visualization", "03_accuracy_throughput"]
CELL_TIMEOUT_S = 600  # per cell; on an idle 2-core CPU each whole notebook takes well under a minute


def needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install -e '.[dev]')")


def test_all_notebooks_are_here() -> None:
    assert [path.stem for path in NOTEBOOKS] == EXPECTED


@needs("nbformat")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_without_outputs(path: Path) -> None:
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {index} has stored outputs"
            assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"


@pytest.mark.slow
@needs("nbformat", "nbclient", "ipykernel")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    """Execute in a fresh kernel from an empty working directory: data and runs go there."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell and its traceback
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in errors if out.output_type == "error"]


# ------------------------------------------------------------- pyra_lightning.visualize (notebook 02)
@pytest.fixture
def traced() -> tuple[torch.nn.Module, torch.Tensor]:
    model = apply_merging(tiny_vit(), [16, 12, 8, 4], trace_source=True).eval()
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_layer_sources_match_the_final_state(traced: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = traced
    sources = layer_sources(model, x)
    assert [tuple(s.shape) for s in sources] == [(2, 49, 65), (2, 37, 65), (2, 29, 65), (2, 25, 65)]
    with torch.no_grad():
        assert torch.equal(sources[-1], model.forward_tokens(x)[1].source)
    for source in sources:
        assert torch.equal(source.sum(dim=1), torch.ones(2, 65)), "every input token is in one group"
    assert not any(block._forward_hooks for block in model.blocks), "hooks are removed"
    model.train()
    assert torch.equal(layer_sources(model, x)[-1], sources[-1]) and model.training, "eval pass, mode kept"


def test_layer_sources_before_any_merge_is_identity() -> None:
    model = apply_merging(tiny_vit(), [0, 8, 0, 4], trace_source=True).eval()
    sources = layer_sources(model, torch.randn(1, 3, 32, 32))
    assert torch.equal(sources[0][0], torch.eye(65))
    assert torch.equal(sources[2], sources[1])


def test_layer_sources_needs_tracing() -> None:
    with pytest.raises(ValueError, match="trace_source=True"):
        layer_sources(apply_merging(tiny_vit(), 4), torch.randn(1, 3, 32, 32))


def test_patch_groups_cover_every_patch(traced: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = traced
    groups = patch_groups(layer_sources(model, x)[-1][0], grid_size=8, num_prefix_tokens=1)
    assert groups.shape == (8, 8)
    assert set(groups.unique().tolist()) == set(range(1, 25)), "24 patch tokens after [CLS]"
    with pytest.raises(ValueError, match="expected"):
        patch_groups(torch.eye(65), grid_size=4)


def test_overlay_paints_each_group_in_its_mean_colour() -> None:
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    source = torch.zeros(3, 5)  # [CLS] + 4 patches of 4x4; patches 0, 1, 3 merged into token 1
    source[0, 0] = source[1, 1] = source[1, 2] = source[1, 4] = source[2, 3] = 1
    out = merge_overlay(image, source, patch_size=4, border=None)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    merged = torch.cat([image[:, :4, :].reshape(3, -1), image[:, 4:, 4:].reshape(3, -1)], dim=1).mean(dim=1)
    alone = image[:, 4:, :4].mean(dim=(1, 2))

    def close(pixels: np.ndarray, colour: torch.Tensor) -> bool:  # uint8 rounding may differ by one
        return bool(np.abs(pixels.astype(int) - (colour * 255).numpy()).max() <= 1)

    assert close(out[:4], merged) and close(out[4:, 4:], merged) and close(out[4:, :4], alone)
    bordered = merge_overlay(image, source, patch_size=4, scale=2, border=(1.0, 0.0, 0.0))
    assert bordered.shape == (16, 16, 3) and (bordered[8, 0] == [255, 0, 0]).all()
    random = merge_overlay(image, source, patch_size=4, colors="random", border=None)
    assert random.shape == (8, 8, 3)


def test_plot_merge_layers_has_a_panel_per_block(traced: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = traced
    sources = layer_sources(model, x)
    image = torch.rand(3, 32, 32)
    figure = plot_merge_layers(image, [s[0] for s in sources], patch_size=4, columns=3, title="t")
    assert len([ax for ax in figure.axes if ax.images]) == 1 + len(sources)
    plt.close(figure)
