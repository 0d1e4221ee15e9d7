"""DINO's collapse ablation (Caron et al. 2021, arXiv 2104.14294, Sec. 5.3 and Fig. 7) on the shapes data.

    python benchmarks/ablate.py                      # 4 short runs, ~1.5 minutes each on a 2-core CPU
    python benchmarks/ablate.py --steps=300 --out=runs/ablate

Runs the shapes preset with
    full             centering + sharpening (tau_t = 0.04 < tau_s = 0.1) + momentum teacher
    centering_only   no sharpening: tau_t = tau_s = 0.1          -> uniform collapse: entropy -> ln K
    sharpening_only  no centering                        -> one-mode collapse: KL(mean || uniform) -> ln K
    no_momentum      teacher = student after every step (m = 0)
and prints one JSON line per setting with the final teacher entropy and KL to uniform next to ln K, then
saves a figure of both signals over the steps (runs/ablate/collapse.png).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py: not installed

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import train  # noqa: E402
from minidino.visualize import read_log  # noqa: E402

SETTINGS = {
    "full": [],
    "centering_only": ["--loss.teacher_temp=0.1", "--loss.warmup_teacher_temp=0.1"],
    "sharpening_only": ["--loss.centering=none"],
    "no_momentum": ["--optim.momentum_teacher=0.0"],
}


def main(argv: list[str]) -> list[dict]:
    steps, out, extra = 150, "runs/ablate", []
    for a in argv:
        if a.startswith("--steps="):
            steps = int(a.split("=", 1)[1])
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            extra.append(a)
    results, curves = [], {}
    for name, args in SETTINGS.items():
        run_dir = os.path.join(out, name)
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            os.remove(os.path.join(run_dir, "checkpoint.pt"))
        if os.path.exists(os.path.join(run_dir, "log.jsonl")):
            os.remove(os.path.join(run_dir, "log.jsonl"))
        train.main(
            [
                "--run.eval_at_end=false",
                "--loss.koleo_weight=0",  # DINO alone: the preset's KoLeo term is not part of the ablation
                f"--run.max_steps={steps}",
                "--run.log_every=5",
                f"--run.out_dir={run_dir}",
                *args,
                *extra,
            ]
        )
        rows = read_log(os.path.join(run_dir, "log.jsonl"))
        curves[name] = rows
        last = rows[-1]
        r = {
            "benchmark": "ablate",
            "setting": name,
            "steps": last["step"],
            "loss": round(last["loss"], 4),
            "teacher_entropy": round(last["teacher_entropy"], 3),
            "teacher_kl_uniform": round(last["teacher_kl_uniform"], 3),
            "ln_K": round(last["ln_K"], 3),
        }
        print(json.dumps(r), flush=True)
        results.append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        steps_ = [r["step"] for r in rows]
        axes[0].plot(steps_, [r["teacher_entropy"] for r in rows], label=name)
        axes[1].plot(steps_, [r["teacher_kl_uniform"] for r in rows], label=name)
    for ax, title in zip(axes, ("teacher entropy (nats)", "KL(mean teacher || uniform) (nats)")):
        ax.axhline(results[0]["ln_K"], color="gray", linestyle="--", label="ln K")
        ax.set(title=title, xlabel="step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "collapse.png"), dpi=100)
    print(f"figure: {os.path.join(out, 'collapse.png')}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
