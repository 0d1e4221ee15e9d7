"""Every tutorial notebook runs top to bottom on CPU (in its quick mode) and ends with its own checks.

The notebooks are stored without outputs; this executes them with nbclient in a fresh kernel, in tutorials/,
with MINIDINO_TUTORIAL_FAST=1 (smaller runs). A failing cell fails the test with the cell's error.
"""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
NOTEBOOKS = sorted(f for f in os.listdir(TUTORIALS) if f.endswith(".ipynb"))


def test_there_are_seven_tutorials_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert len(NOTEBOOKS) == 7
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name


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
