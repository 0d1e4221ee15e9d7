"""Every tutorial notebook is stored executed (its figures visible on the web) by its current code, and runs
top to bottom on CPU in its quick mode, ending with its own checks.

`python tutorials/run.py` executes the notebooks in their full mode and stores them with a hash of their code
cells; the first test compares that hash with the code cells on disk. The second executes each notebook with
nbclient in a fresh kernel, in tutorials/, with MINIDINO_TUTORIAL_FAST=1 (smaller runs); the stored copy is
not changed. A failing cell fails the test with the cell's error.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
_spec = importlib.util.spec_from_file_location("tutorials_run", os.path.join(TUTORIALS, "run.py"))
run_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_py)
NOTEBOOKS = run_py.notebooks()  # the list tutorials/run.py executes


def test_there_are_eight_tutorials():
    assert len(NOTEBOOKS) == 8


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_come_from_the_current_code(name):
    nbformat = pytest.importorskip("nbformat")
    path = os.path.join(TUTORIALS, name)
    nb = nbformat.read(path, as_version=4)
    stored = nb.metadata.get("minidino", {})
    assert stored.get("mode") == "full", f"{name}: not stored by `python tutorials/run.py {name[:2]}`"
    assert stored.get("code_sha256") == run_py.code_hash(nb), (
        f"{name}: its code cells changed after it was executed; run `python tutorials/run.py {name[:2]}`"
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{name}: a code cell was not executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])), name
    assert run_py.images(nb) >= 1, f"{name}: no figure in its stored outputs"
    assert os.path.getsize(path) <= run_py.MAX_BYTES, f"{name}: over {run_py.MAX_BYTES} bytes"


def test_code_hash_changes_with_the_code_only():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 1")]
    )
    before = run_py.code_hash(nb)
    nb.cells[0].source = "# another title"
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1")]
    assert run_py.code_hash(nb) == before
    nb.cells[1].source = "x = 2"
    assert run_py.code_hash(nb) != before


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch, request):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MINIDINO_TUTORIAL_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
    if any("TRITON_INTERPRET" in c.source for c in nb.cells):  # runs the Triton kernels on CPU
        request.getfixturevalue("triton_interpreter")
    resources = {"metadata": {"path": TUTORIALS}}  # run in tutorials/, as a reader would
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError with the failing cell's traceback
