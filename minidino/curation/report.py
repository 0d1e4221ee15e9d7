"""What `python -m minidino.curation` writes besides files.txt: report.json (counts and settings), report.md with
its figures (duplicate groups, the threshold sweep, samples of the top-level clusters, cluster sizes before
and after balancing) and the optional folder of links to the kept images."""

from __future__ import annotations

import json
import math
import os

import torch

from ..visualize import plot_cluster_sizes, plot_image_rows, plot_threshold_sweep
from .similarity import entropy

# A warning when more than this share of the images removed as duplicates are less similar than the threshold
# to the image kept for their group (curate.weakly_linked): on tutorial 03's pool (nine copies of each circle, a
# 10-epoch backbone) 45 % at 0.915 (pair precision 0.15), 26 % at 0.93 (0.49), 11 % at 0.95 (0.88), 9.5 % at
# 0.96 (0.95); on a pool with one copy per image it is 0 unless groups of three or more form.
CHAIN_WARNING = 0.25


def write_links(kept: list[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # a second run replaces the links of the first
        os.remove(os.path.join(folder, name))
    for i, p in enumerate(kept):
        os.symlink(os.path.abspath(p), os.path.join(folder, f"{i:06d}_{os.path.basename(p)}"))


def write_report(paths: list[str], pool: dict, result: dict, args) -> dict:
    """report.json (counts and settings), report.md with the figures: duplicate groups, the threshold sweep
    (curate.threshold_sweep), samples of the top-level clusters, cluster sizes before and after balancing."""
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
        "threshold_sweep": result["sweep"],
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
    if result["sweep"]:
        report["figures"]["threshold"] = plot_threshold_sweep(
            result["sweep"], args.threshold, CHAIN_WARNING, os.path.join(args.out, "threshold.png")
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
        "Deduplication around this threshold: images removed, groups, the largest group, and how many "
        "of the removed images are less similar than the threshold to the image kept for their group (joined "
        f"only through chains; over {CHAIN_WARNING:.0%} of them warns that the threshold is too low for the pool).",
        "",
        "| threshold | removed | groups | largest group | joined only through chains |",
        "|---|---|---|---|---|",
        *(
            f"| {r['threshold']:g}{' (used)' if r['threshold'] == args.threshold else ''} | {r['removed']} | "
            f"{r['groups']} | {r['largest']} | {r['weakly_linked']} ({r['weak_share']:.0%}) |"
            for r in result["sweep"]
        ),
        "",
    ]
    lines += [f"![{k}]({v})\n" for k, v in report["figures"].items()]
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(lines))
    return report
