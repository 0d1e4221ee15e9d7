import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so tests can import train.py and eval.py

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


# The attention kernels loop up to a bound read at run time (`for j in range(0, n, BLOCK_N)`). Triton's
# interpreter before 3.8 turns that bound into an int with int() of a 1-element array, which recent NumPy
# (seen with 2.4) refuses: "only 0-dimensional arrays can be converted to Python scalars". Triton 3.8 fixed
# it. The fixture probes for exactly that, rather than guessing from version numbers, and skips with the
# reason; the GPU tests and tests/test_kernels_compile.py still cover the kernels on such a setup.
LOOP_PROBE = r"""
import torch, triton, triton.language as tl

@triton.jit
def count(out_ptr, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)

out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
print("ok" if out.item() == 3 else f"counted {out.item()} of 3")
"""


def run_python(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter, with sys.argv[1] = the repository root (then `args`) and these
    environment variables set. The Triton tests need it: TRITON_INTERPRET must be fixed before triton is
    first imported, and this test process may have imported it already."""
    return subprocess.run(
        [sys.executable, "-c", script, ROOT, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_printed_ok(res: subprocess.CompletedProcess) -> None:
    """The script ran to its end, where it prints exactly 'ok' after its own assertions."""
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout[-1000:] + res.stderr[-3000:]


@pytest.fixture(scope="session")
def triton_interpreter():
    """Skips when Triton is missing or its interpreter cannot run the attention kernels' loops."""
    pytest.importorskip("triton")
    res = run_python(LOOP_PROBE, TRITON_INTERPRET="1")
    if "only 0-dimensional arrays" in res.stderr:
        pytest.skip(
            "this Triton's interpreter cannot loop to a run-time bound with this NumPy (fixed in Triton 3.8)"
        )
    assert_printed_ok(res)


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: torchrun + gloo tests; run alone with -m distributed")
