"""Shared test helpers, and how the Triton kernel tests run on a machine without a GPU.

Tests marked `triton` run the kernels on `kernel_device`: the GPU when there is one, else the CPU through
Triton's interpreter. The interpreter must be switched on (TRITON_INTERPRET=1) before triton is first
imported, and this process has imported it already, so on a CPU-only machine all `triton` tests of the
session run together in ONE child pytest with TRITON_INTERPRET=1; each test here then reports its child's
outcome (failure text included). Run `TRITON_INTERPRET=1 python -m pytest -m triton tests` to do it by hand.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
RESULTS = "MINIDINO_TEST_RESULTS"  # set in the child: where it writes each test's outcome

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_run(run_dir, *extra: str) -> list[str]:
    """Options for a seconds-long shapes run: 32 images, batch 16 (2 steps per epoch, 4 steps), no workers."""
    return [
        "--data.n_train=32",
        "--data.n_test=16",
        "--optim.batch_size=16",
        "--optim.epochs=2",
        "--optim.warmup_epochs=1",
        "--data.num_workers=0",
        "--run.log_every=1",
        "--head.out_dim=64",
        "--head.hidden_dim=64",
        "--head.bottleneck_dim=32",
        "--data.local_crops_number=2",
        f"--run.out_dir={run_dir}",
        *extra,
    ]


@pytest.fixture
def kernel_device(triton_interpreter) -> str:
    """Where `triton` tests run their kernels: 'cuda', or 'cpu' under the interpreter."""
    return "cuda" if CUDA else "cpu"


def interpreter_can_loop() -> bool:
    """Whether this Triton's interpreter (this process has TRITON_INTERPRET=1) runs a loop to a run-time bound.

    The kernels loop up to a bound read at run time (`for j in range(0, n, BLOCK_N)`). Triton's interpreter
    before 3.8 turns that bound into an int with int() of a 1-element array, which recent NumPy (seen with
    2.4) refuses: "only 0-dimensional arrays can be converted to Python scalars". This probes for exactly
    that, rather than guessing from version numbers."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except (TypeError, ValueError) as e:
        if "only 0-dimensional arrays" in str(e):
            return False
        raise
    assert out.item() == 3, out
    return True


@pytest.fixture(scope="session")
def triton_interpreter():
    """Skips when Triton is missing, or (without a GPU) when its interpreter cannot run the kernels' loops;
    the GPU tests and tests/test_kernels_compile.py still cover the kernels on such a setup."""
    pytest.importorskip("triton")
    if CUDA:
        return
    if INTERPRET:
        ok = interpreter_can_loop()
    else:  # ask a process with the interpreter on
        code = "import conftest; print(conftest.interpreter_can_loop())"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        res = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        ok = res.stdout.strip().endswith("True")
    if not ok:
        pytest.skip(
            "this Triton's interpreter cannot loop to a run-time bound with this NumPy (fixed in 3.8)"
        )


def _in_child(item) -> bool:
    """A `triton` test on a CPU-only machine in a process without the interpreter: the child runs it."""
    return item.get_closest_marker("triton") is not None and not (INTERPRET or CUDA)


def pytest_collection_modifyitems(config, items):
    config._interpreter_ids = [item.nodeid for item in items if _in_child(item)]


def _interpreter_outcomes(config) -> dict:
    """Runs every collected `triton` test in one child pytest under TRITON_INTERPRET=1 (once per session)."""
    if not hasattr(config, "_interpreter_outcomes"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "outcomes.jsonl")
            env = {**os.environ, "TRITON_INTERPRET": "1", RESULTS: path}
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *config._interpreter_ids]
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            outcomes = {}
            if os.path.exists(path):
                with open(path) as fh:
                    outcomes = {row["nodeid"]: row for row in map(json.loads, fh)}
        config._interpreter_outcomes = outcomes
        config._interpreter_output = res.stdout[-3000:] + res.stderr[-3000:]
    return config._interpreter_outcomes


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not _in_child(pyfuncitem):
        return None
    row = _interpreter_outcomes(pyfuncitem.config).get(pyfuncitem.nodeid)
    if row is None:
        pytest.fail(f"the interpreter child did not run this test:\n{pyfuncitem.config._interpreter_output}")
    if row["outcome"] == "skipped":
        pytest.skip(row["text"])
    if row["outcome"] == "failed":
        pytest.fail(f"under TRITON_INTERPRET=1:\n{row['text']}", pytrace=False)
    return True  # passed in the child


def pytest_runtest_logreport(report):
    """In the child: one line per test with its outcome (a failure in setup or call, a skip, or a pass)."""
    path = os.environ.get(RESULTS)
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    text = (
        report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else str(report.longrepr)
    )
    with open(path, "a") as fh:
        fh.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome, "text": text}) + "\n")
