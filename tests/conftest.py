import os
import sys

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


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: torchrun + gloo tests; run alone with -m distributed")
