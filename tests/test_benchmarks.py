"""The benchmark scripts' CPU paths run and print well-formed JSON lines (what a machine without a GPU can
check of them; the numbers themselves are not tested)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def json_lines(script: str, *args: str) -> list[dict]:
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_attention_benchmark_runs_on_cpu():
    rows = json_lines("attention.py", "--quick", "--graphs")  # --graphs only acts on a GPU
    shapes = {r["shape"] for r in rows if r["benchmark"] == "attention"}
    assert shapes == {"tiny_global", "tiny_local", "dino_step_packed"}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and "error" not in r, r


def test_attention_overhead_stub_measures_the_wrapper():
    pytest.importorskip("triton")
    (row,) = json_lines("attention_overhead.py", "--stub")
    times = [row[f"fb_host_us_{name}"] for name in ("nothing", "triton", "triton_qkv")]
    assert all(t > 0 for t in times), row
    # the wrapper went through the launcher's direct path (3 launches per call, 7 rounds x 2100 calls x 2):
    # nearly always; CPU buffers are 64-byte aligned, so a buffer's address mod 128 (part of the launcher's
    # key) sometimes makes a new kind of call, which goes the usual way
    assert row["stubbed_launches"] > 0.9 * 3 * 7 * 2100 * 2, row


def test_step_benchmark_runs_on_cpu_with_its_profile():
    rows = json_lines("step.py", "--preset", "shapes", "--steps=1", "--warmup=1", "--profile", "--syncs")
    assert [r["benchmark"] for r in rows] == ["step", "step_profile", "step_syncs"]
    assert rows[2]["count"] == sum(rows[2]["places"].values()) > 0  # the step's non-finite check, at least
    assert rows[0]["images_per_s"] > 0 and rows[0]["peak_memory_mb"] > 0, rows[0]
    ops = rows[1]["top_host_ops_ms"]  # the ViT's matrix products are among the ten largest host-side ops
    assert rows[1]["wall_ms_per_step"] > 0 and any("mm" in name for name, _ in ops[:10]), ops


def test_curation_benchmark_runs_on_cpu(tmp_path):
    import train
    from conftest import tiny_run

    run = tmp_path / "run"
    train.main(tiny_run(run, "--run.eval_at_end=false"))
    rows = json_lines(
        "curation.py",
        "duplicates",
        "--backbone",
        str(run),
        "--n",
        "40",
        "--copies",
        "12",
        "--copy-steps",
        "2",
    )
    assert {(r["feature"], r["backbone"]) for r in rows} == {
        (f, b) for f in ("copy", "cls") for b in ("trained", "random_init")
    }
    from minidino.curation.curate import CLS_THRESHOLD, DEFAULT_THRESHOLD

    thresholds = {r["threshold"] for r in rows}  # the same grid for each, the defaults in it
    assert len(rows) == 4 * len(thresholds) and {DEFAULT_THRESHOLD, CLS_THRESHOLD} <= thresholds
    for r in rows:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["copies"] == 12 and r["images"] == 52
        assert r["recall_exact"] in (None, 1.0), r  # an exact copy is found at any threshold below 1
    (row,) = json_lines(
        "curation.py", "balance", "--backbone", str(run), "--per-class", "3", "--sample", "24"
    )
    assert (
        row["classes_pool"] == [30] + [3] * 7 and row["sample"] == 24 and sum(row["classes_balanced"]) == 24
    )
    (row,) = json_lines("curation.py", "messy-pool", str(tmp_path / "messy"), "--n", "16", "--copies", "16")
    assert row["classes"] == [18] + [2] * 7 and len(list((tmp_path / "messy").iterdir())) == 32


def test_data_benchmark_makes_jpegs_and_times_each_pipelines_stages(tmp_path):
    (made,) = json_lines("data.py", "--make-jpegs", str(tmp_path / "jpegs"), "12")
    assert made["made_jpegs"] == 12 and len(list((tmp_path / "jpegs").glob("*/*.jpg"))) == 12
    small = ["--data.global_crops_size=64", "--data.local_crops_size=32", "--data.local_crops_number=2"]
    rows = json_lines(
        "data.py", "--preset", "imagenet", f"--data.root={tmp_path / 'jpegs'}", "--optim.batch_size=4",
        "--pipelines=pil,crops", "--workers=0", "--threads=1", "--batches=2", "--repeats=2", *small,
    )  # fmt: skip
    pil, crops, ratios = rows
    assert (pil["augment"], crops["augment"]) == ("pil", "crops") and crops["crops"] == "2x64+2x32"
    for r in (pil, crops):
        ms = r["ms_per_image"]
        assert r["images_per_s"] > 0 and ms["decode"] > 0 and ms["per_image"] > 0 and r["repeats"] == 2
        assert r["total_ms_per_image"] >= r["worker_ms_per_image"] > 0
    assert pil["ms_per_image"]["photometrics"] == 0 < crops["ms_per_image"]["photometrics"]
    ratio = ratios["ratios"]["crops_vs_pil_workers0"]
    assert ratio["images_per_s"] > 0 and ratio["worker_part"] > 0


SMALL_CROPS = "--data.global_crops_size=32 --data.local_crops_size=16 --data.local_crops_number=2"


def gpu_checks(tmp_path, section: str, **env: str) -> list[dict]:
    """Run one section of benchmarks/gpu_checks.sh (logs in tmp_path/logs) and return its JSON log."""
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), section],
        cwd=ROOT, env={**os.environ, "OUT": str(tmp_path / "logs"), **env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in (tmp_path / "logs" / f"{section}.jsonl").read_text().splitlines()]


def test_gpu_checks_data_section_runs_on_cpu(tmp_path):
    """The `data` section of benchmarks/gpu_checks.sh, at toy sizes: JPEGs made, both pipelines measured,
    the step benchmark beside them, all in the section's log (what a GPU machine runs at full size)."""
    rows = gpu_checks(
        tmp_path, "data", JPEGS=str(tmp_path / "jpegs"), DATA_JPEGS="6", DATA_BATCH="2", DATA_WORKERS="0",
        DATA_ARGS=SMALL_CROPS,
        STEP_ARGS=f"{SMALL_CROPS} --optim.batch_size=2 --steps=1 --warmup=1 --model.arch=vit_nano --head.out_dim=64",
    )  # fmt: skip
    assert rows[0]["made_jpegs"] == 6
    assert [r.get("augment") for r in rows[1:3]] == ["crops", "pil"] and "ratios" in rows[3]
    assert rows[4]["benchmark"] == "step" and rows[4]["images_per_s"] > 0


def test_gpu_checks_switches_section_runs_on_cpu_and_makes_its_table(tmp_path):
    """The `switches` section of benchmarks/gpu_checks.sh at toy sizes: for DINO and DINOv2 one line per
    switch, each built afresh in one process (the compiled ones are left to tests/test_train.py: inductor on a
    CPU takes minutes); the markdown table gives each row as a ratio to its eager row."""
    rows = gpu_checks(
        tmp_path, "switches", SWITCH_BATCHES="4", SWITCHES="eager,bf16_residual",
        SWITCH_ARGS=f"{SMALL_CROPS} --warmup=1 --steps=1 --model.arch=vit_nano --model.patch_size=8 --head.out_dim=64"
        " --loss.koleo_group=0",  # DINOv2's KoLeo group of 64 images does not fit a batch of 4
    )  # fmt: skip
    assert [(r["method"], r["switch"]) for r in rows] == [
        (method, switch) for method in ("dino", "dinov2") for switch in ("eager", "bf16_residual")
    ]
    assert all(r["images_per_s"] > 0 for r in rows)
    table = (tmp_path / "logs" / "switches.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| dino | 4 | eager |") and "| 1.00 |" in table[2]


def test_gpu_checks_cifar10_section_extracts_and_runs_a_budgeted_run_on_cpu(tmp_path):
    """The `cifar10` section of benchmarks/gpu_checks.sh on a toy archive in CIFAR-10's layout: extracted,
    then benchmarks/budget.py runs the cifar10 preset (its CPU recipe here) with a budget of 18 seconds and
    prints the run's line: within the budget, with k-NN against random init."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 8)):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / "src" / "cifar10" / split / c)
            for i in range(n // 2):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "src" / "cifar10" / split / c / f"{i}.jpg")
    subprocess.run(
        ["tar", "-czf", str(tmp_path / "c.tar.gz"), "-C", str(tmp_path / "src"), "cifar10"], check=True
    )
    tiny = (
        "--optim.batch_size=8 --data.num_workers=0 --head.out_dim=64 --head.hidden_dim=64 --run.log_every=2"
    )
    (row,) = gpu_checks(
        tmp_path, "cifar10", CIFAR10_TAR=str(tmp_path / "c.tar.gz"), CIFAR10_DATA=str(tmp_path / "data"),
        CIFAR10_MINUTES="0.3", CIFAR10_ARGS=tiny,
    )  # fmt: skip
    assert os.path.isdir(tmp_path / "data" / "cifar10" / "test" / "dog")
    assert row["minutes"] == 0.3 and row["wall_s"] < 0.3 * 60 + 8  # + the process's start-up (imports)
    assert row["steps"] > 6 and row["knn_top1"] is not None and row["knn_top1_random_init"] is not None
