"""DDP and FSDP2 on CPU with 2 Gloo processes (torchrun), against one process with the same global batch.

Run these alone with `python -m pytest -m distributed tests`. Equal results need the same views and the same
noise in both runs: per-image augmentation (views seeded by image index), no stochastic depth, and no
BatchNorm in the head (SyncBatchNorm, used on GPUs, does not run on CPU). The centre
and Sinkhorn statistics are all-reduced, so 2 processes x 4 images must match 1 process x 8 images.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from minidino.weights import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.distributed


def _opts(run_dir, *extra):
    return [
        "--data.n_train=32", "--data.n_test=16", "--optim.batch_size=8", "--optim.epochs=1",
        "--optim.warmup_epochs=1", "--data.num_workers=0", "--run.log_every=1", "--head.out_dim=64",
        "--head.hidden_dim=64", "--head.bottleneck_dim=32", "--data.local_crops_number=2",
        "--data.augment=pil", "--model.drop_path=0", "--head.use_bn=false", "--loss.koleo_weight=0",
        f"--run.out_dir={run_dir}", *extra,
    ]  # fmt: skip


def _torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *args,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def _losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("ddp", ("--loss.koleo_weight=0.1", "--loss.koleo_group=4")),
        ("fsdp", ("--method=dinov2", "--loss.koleo_group=0", "--run.eval_at_end=false")),
    ],
)
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, mode, extra):
    # ddp: KoLeo in groups of 4 images, each process's share; fsdp: the DINOv2 objective (Sinkhorn-Knopp,
    # iBOT masks drawn for the global batch) with KoLeo over the whole batch of 8, a group that spans both
    # processes (gathered, its gradient sent back): the same numbers as one process either way
    extra = (*extra, "--run.eval_at_end=false") if mode == "ddp" else extra
    train.main(_opts(tmp_path / "one", *extra))
    _torchrun(*_opts(tmp_path / "two", *extra), f"--run.parallel={mode}")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-4, rtol=1e-4)
    a, b = (load_checkpoint(str(tmp_path / d)) for d in ("one", "two"))
    for part in ("student", "teacher"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=1e-4, rtol=1e-3, msg=f"{part} {k}")


def test_fsdp_checkpoint_resumes_in_one_process_and_back(tmp_path):
    train.main(_opts(tmp_path / "one", "--run.eval_at_end=false"))
    out = _torchrun(*_opts(tmp_path / "two", "--run.max_steps=2"), "--run.parallel=fsdp")
    assert "k-NN top-1" in out  # the k-NN at the end ran with features gathered from both processes
    train.main(["--resume", str(tmp_path / "two"), "--run.max_steps=0", "--run.eval_at_end=false"])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-4, rtol=1e-4)
    # and the other way round: a one-process checkpoint resumed by 2 FSDP processes
    train.main(_opts(tmp_path / "three", "--run.max_steps=2", "--run.eval_at_end=false"))
    _torchrun(
        "--resume", str(tmp_path / "three"), "--run.max_steps=0", "--run.eval_at_end=false", "--parallel=fsdp"
    )
    three = _losses(tmp_path / "three")
    torch.testing.assert_close(torch.tensor(three), torch.tensor(one), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_a_torchrun_worker_leaves_without_the_interpreter_shutdown(under_torchrun):
    # the shutdown is where Gloo's threads can abort a finished FSDP2 run (minidino/dist.py): under torchrun
    # exit_worker() skips it (an atexit handler does not run) after flushing what was printed, and exits 0
    code = (
        "import atexit, sys\n"
        "from minidino.dist import exit_worker\n"
        "atexit.register(lambda: print('shutdown ran'))\n"
        "print('trained', end='')\n"
        "exit_worker()\n"
        "print(' and returned')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    if under_torchrun:
        env.update(RANK="0", WORLD_SIZE="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ("trained" if under_torchrun else "trained and returned\nshutdown ran\n")
