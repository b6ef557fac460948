"""colab/quickstart.ipynb runs headlessly, cell by cell, on a tiny version of its comparison."""

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "quickstart.ipynb"
KERNEL_NAME = "optpo-test-python"
TINY_RUN = {
    "OPTPO_QUICKSTART_STEPS": "2",
    "OPTPO_QUICKSTART_PROMPTS": "16",
    "OPTPO_QUICKSTART_ROWS": "64",
    "OPTPO_QUICKSTART_EVAL_EVERY": "1",
    "OPTPO_QUICKSTART_EVAL_SAMPLES": "2",
    "OPTPO_QUICKSTART_FINAL_SAMPLES": "4",
}


def install_kernel_spec(folder: Path) -> None:
    """A kernel spec that starts this interpreter, so the notebook sees the environment under test."""
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "optpo-jax test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def output_text(cell) -> str:
    """Everything a code cell printed or returned as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell in a fresh kernel (raises CellExecutionError on any error)."""
    folder = tmp_path_factory.mktemp("notebook")
    install_kernel_spec(folder / "jupyter")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder / "jupyter"))
        for name, value in {**TINY_RUN, "OPTPO_QUICKSTART_WORKDIR": str(folder / "runs")}.items():
            patch.setenv(name, value)
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=300,
                                         resources={"metadata": {"path": str(folder)}})
        client.execute()
    return notebook


def test_notebook_runs_without_errors_and_installs_nothing_outside_colab(executed):
    code_cells = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code_cells)
    assert not any(output.get("output_type") == "error" for cell in code_cells for output in cell.outputs)
    assert "pip" in code_cells[0].source and not code_cells[0].outputs


def test_notebook_compares_both_methods(executed):
    text = "".join(output_text(cell) for cell in executed.cells if cell.cell_type == "code")
    assert "| optpo | " in text and "| ttrl | " in text
    assert "OptPO drew" in text


def test_notebook_shows_both_figures(executed):
    images = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) == 2


def test_notebook_skips_the_real_model_part_off_colab(executed):
    last = [cell for cell in executed.cells if cell.cell_type == "code"][-1]
    assert "math_lora_config" in last.source
    assert output_text(last).startswith("Part 2 skipped: it runs on a Colab GPU/TPU runtime only")


def test_notebook_vmapped_sprt_toy_stops_the_unanimous_prompts(executed):
    text = "".join(output_text(cell) for cell in executed.cells if cell.cell_type == "code")
    assert "done: [[True, False], [False, True], [False, False]]" in text
    assert "all stopped: True" in text
