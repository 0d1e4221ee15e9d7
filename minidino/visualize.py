"""Pictures: training curves from a run's log.jsonl (loss, schedules and DINO's collapse signals)."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_training_curves(log_path: str, out_path: str) -> str:
    """Loss terms, learning rate / teacher temperature, and collapse signals against the step, one PNG.

    The collapse panel shows the teacher's mean entropy and the KL of its batch-mean distribution from
    uniform next to ln K: entropy at ln K is uniform collapse, KL at ln K is one-prototype collapse.
    """
    rows = read_log(log_path)
    steps = [r["step"] for r in rows]
    knn = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    fig, axes = plt.subplots(1, 4 if knn else 3, figsize=(20 if knn else 15, 4))
    for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
        axes[0].plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), label=key)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows], label="lr", color="tab:blue")
    axes[1].set(title="schedules", xlabel="step", ylabel="lr")
    twin = axes[1].twinx()
    twin.plot(steps, [r["teacher_temp"] for r in rows], label="teacher temp", color="tab:red")
    twin.set_ylabel("teacher temperature")
    axes[1].legend(loc="upper left")
    twin.legend(loc="upper right")
    axes[2].plot(steps, [r["teacher_entropy"] for r in rows], label="teacher entropy")
    axes[2].plot(steps, [r["teacher_kl_uniform"] for r in rows], label="KL(mean teacher || uniform)")
    axes[2].axhline(rows[-1]["ln_K"], color="gray", linestyle="--", label="ln K")
    axes[2].set(title="collapse signals (nats)", xlabel="step")
    axes[2].legend()
    if knn:
        axes[3].plot(*zip(*knn), marker="o")
        axes[3].set(title="k-NN top-1 of the teacher (%)", xlabel="step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
