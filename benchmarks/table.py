"""The step benchmark's JSON lines as one markdown table, each row's speed as a ratio to the eager row of the
same method and batch (which came from the same process).

    python benchmarks/step.py --preset imagenet --switches=every | tee step.jsonl
    python benchmarks/table.py step.jsonl
"""

from __future__ import annotations

import json
import sys


def rows(lines: list[str]) -> list[dict]:
    return [r for r in (json.loads(x) for x in lines if x.startswith("{")) if r.get("benchmark") == "step"]


def table(results: list[dict]) -> str:
    eager: dict = {}  # the first eager line of each method and batch is the base
    for r in results:
        if r.get("switch") == "eager":
            eager.setdefault((r["method"], r["batch_size"]), r["images_per_s"])
    out = [
        "| method | batch | switch | images/s | x eager | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            out.append(f"| | | {r['switch']} | skipped: {r['skipped']} | | |")
            continue
        base = eager.get((r["method"], r["batch_size"]))
        ratio = f"{r['images_per_s'] / base:.2f}" if base else ""
        gib = r["peak_memory_mb"] / 1024
        out.append(
            f"| {r['method']} | {r['batch_size']} | {r['switch']} | {r['images_per_s']:.4g} | {ratio} | {gib:.2f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(table(rows(fh.read().splitlines())))
