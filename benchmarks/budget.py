"""Runs sized to wall-clock budgets (--run.minutes): what k-NN a machine gets in M minutes.

    python benchmarks/budget.py --minutes=10,30,60 --preset cifar10 --data.root=data/cifar10
    python benchmarks/budget.py --minutes=10 --out=runs/budget --plot=runs/budget/knn.png --preset cifar10 ...

Each budget is one `python train.py ... --run.minutes=M --run.out_dir=OUT/M` in a fresh process (its wall time
is the command's, start-up included), and prints one JSON line: the budget and the wall time, the plan
(steps, passes over the data, measured steps/s), the images/s of the training log, and the final k-NN
(k=20) of the trained ViT next to the same ViT at random init. --plot draws k-NN against minutes. Options
other than --minutes, --out and --plot go to train.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from step import device_name  # benchmarks/step.py: the same machine label as the step lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_budget(minutes: float, out: str, args: list[str]) -> dict:
    run_dir = os.path.join(out, f"{minutes:g}min")
    for name in ("checkpoint.pt", "log.jsonl", "plan.json", "knn.json"):  # a fresh run in the same folder
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--run.minutes={minutes:g}"]
    cmd.append(f"--run.out_dir={run_dir}")
    clock = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)  # stdout: only this script's JSON lines
    wall = time.perf_counter() - clock
    with open(os.path.join(run_dir, "plan.json")) as fh:
        plan = json.load(fh)
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    knn = {}
    if os.path.exists(os.path.join(run_dir, "knn.json")):
        with open(os.path.join(run_dir, "knn.json")) as fh:
            knn = json.load(fh)
    rates = [r["images_per_s"] for r in rows[1:]] or [r["images_per_s"] for r in rows]  # first: warm-up
    return {
        "benchmark": "budget",
        "minutes": minutes,
        "wall_s": round(wall, 1),
        "steps": plan["steps"],
        "passes": round(plan["steps"] * plan["batch_size"] / plan["images"], 3),
        "steps_per_s": round(plan["steps_per_s"], 3),
        "images_per_s": round(sum(rates) / len(rates), 1),
        "eval_s_planned": round(plan["eval_s"], 1),
        "knn_top1": knn.get("knn_top1"),
        "knn_top1_random_init": knn.get("knn_top1_random_init"),
        "final_loss": rows[-1]["loss"],
        "machine": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "args": " ".join(args),
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["minutes"] for r in rows], [r["knn_top1"] for r in rows], "o-", label="trained")
    ax.plot(
        [r["minutes"] for r in rows], [r["knn_top1_random_init"] for r in rows], "s--", label="random init"
    )
    ax.set(
        xlabel="budget (minutes, training + evaluation)", ylabel="k-NN top-1 (%)", title=rows[0]["machine"]
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}", file=sys.stderr)


def main(argv: list[str]) -> list[dict]:
    minutes, out, figure, args = [10.0], "runs/budget", "", []
    for a in argv:
        if a.startswith("--minutes="):
            minutes = [float(m) for m in a.split("=", 1)[1].split(",")]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a.startswith("--plot="):
            figure = a.split("=", 1)[1]
        else:
            args.append(a)
    rows = []
    for m in minutes:
        rows.append(run_budget(m, out, args))
        print(json.dumps(rows[-1]), flush=True)
    if figure and all(r["knn_top1"] is not None for r in rows):
        plot(rows, figure)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
