"""What `python -m minidino.curate` writes besides files.txt: report.json (counts and settings), report.md with
its figures (duplicate groups, samples of the top-level clusters, cluster sizes before and after balancing)
and the optional folder of links to the kept images."""

from __future__ import annotations

import json
import math
import os

import torch

from .similarity import entropy
from .visualize import plot_cluster_sizes, plot_image_rows


def write_links(kept: list[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # a second run replaces the links of the first
        os.remove(os.path.join(folder, name))
    for i, p in enumerate(kept):
        os.symlink(os.path.abspath(p), os.path.join(folder, f"{i:06d}_{os.path.basename(p)}"))


def write_report(paths: list[str], pool: dict, result: dict, args) -> dict:
    """report.json (counts and settings), report.md with the figures: duplicate groups, samples of the
    top-level clusters, cluster sizes before and after balancing."""
    top = result["levels"][-1]
    sizes = torch.bincount(top)
    in_sample = result["kept"][result["candidates"]]
    after = torch.bincount(top[in_sample], minlength=len(sizes))
    report = {
        "stages": dict(result["stages"]),
        "unreadable": [p for p, ok in zip(paths, pool["readable"].tolist()) if not ok],
        "duplicate_groups": len(result["groups"]),
        "duplicate_feature": f"copy descriptor ({args.copy_steps} steps)" if args.copy_steps else "cls",
        "contaminated": [paths[i] for i in result["contaminated"]],
        "threshold": args.threshold,
        "levels": [int(lab.max()) + 1 for lab in result["levels"]],
        "top_cluster_sizes": sizes.tolist(),
        "top_cluster_sizes_after": after.tolist(),
        "top_cluster_entropy": [entropy(sizes), entropy(after)],
        "figures": {},
    }
    g = torch.Generator().manual_seed(args.seed)
    if result["groups"]:
        groups = sorted(result["groups"], key=len, reverse=True)[:8]
        rows = [[paths[i] for i in grp[:10]] for grp in groups]
        titles = [["kept"] + ["removed"] * (len(r) - 1) for r in rows]
        labels = [f"{len(grp)} images" for grp in groups]
        report["figures"]["duplicates"] = plot_image_rows(
            rows, labels, os.path.join(args.out, "duplicates.png"), titles
        )
    clusters = sizes.argsort(descending=True)[:10].tolist()
    rows = []
    for c in clusters:
        members = result["candidates"][top == c]
        rows.append([paths[i] for i in members[torch.randperm(len(members), generator=g)[:8]].tolist()])
    labels = [f"cluster {c}\n{int(sizes[c])} images" for c in clusters]
    report["figures"]["clusters"] = plot_image_rows(rows, labels, os.path.join(args.out, "clusters.png"))
    report["figures"]["cluster_sizes"] = plot_cluster_sizes(
        sizes.tolist(), after.tolist(), os.path.join(args.out, "cluster_sizes.png")
    )
    report["figures"] = {k: os.path.basename(v) for k, v in report["figures"].items()}
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    lines = ["# Curation report", "", "| stage | images |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in result["stages"]]
    lines += [
        "",
        f"Duplicate groups: {len(result['groups'])} (cosine >= {args.threshold}); unreadable files: "
        f"{len(report['unreadable'])}; contaminated: {len(report['contaminated'])}.",
        f"Entropy of the top-level cluster sizes: {report['top_cluster_entropy'][0]:.3f} nats in the pool, "
        f"{report['top_cluster_entropy'][1]:.3f} in the output (ln {len(sizes)} = {math.log(len(sizes)):.3f}: "
        "balanced).",
        "",
    ]
    lines += [f"![{k}]({v})\n" for k, v in report["figures"].items()]
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(lines))
    return report
