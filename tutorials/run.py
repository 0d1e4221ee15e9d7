"""Execute the tutorial notebooks in their full mode and store them with their outputs.

    python tutorials/run.py                 # every notebook, one after the other (~40 min on a 2-core CPU)
    python tutorials/run.py 05 08           # the notebooks whose names start with these prefixes
    python tutorials/run.py --fast 05       # the test suite's quick mode, to try an edit: nothing is written

Each notebook runs in a fresh kernel in tutorials/ (its run folders go to tutorials/runs/, ignored by git), as
a reader would run it. The stored copy keeps every output and, in its metadata, a hash of its code cells:
tests/test_tutorials.py checks that the outputs on the web were made by the code next to them, so a notebook
whose code is edited has to be run again. Needs the test extras (`pip install -e ".[test]"`: nbclient,
nbformat, ipykernel).
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BYTES = 1_500_000  # the most a stored notebook may weigh (its figures are most of it)


def notebooks(prefixes: list[str] = ()) -> list[str]:
    """The tutorial notebooks' file names, sorted; only those starting with one of `prefixes` if given."""
    names = sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))
    chosen = [n for n in names if not prefixes or n.startswith(tuple(prefixes))]
    missing = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if missing:
        raise SystemExit(
            f"tutorials/run.py: no notebook starts with {', '.join(missing)} (have: {', '.join(names)})"
        )
    return chosen


def code_hash(nb) -> str:
    """sha256 of the notebook's code cells (their sources, in order): what the stored outputs were made by."""
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def images(nb) -> int:
    """How many PNG figures the notebook's stored outputs hold."""
    return sum(
        "image/png" in out.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
    )


def execute(name: str, fast: bool) -> tuple[object, float]:
    """Run one notebook in a fresh python3 kernel in tutorials/; returns (executed notebook, seconds)."""
    import nbclient
    import nbformat
    from tqdm import tqdm

    nb = nbformat.read(os.path.join(HERE, name), as_version=4)
    os.environ.pop("MPLBACKEND", None)  # the kernel inherits the environment: keep its inline figures
    if fast:
        os.environ["MINIDINO_TUTORIAL_FAST"] = "1"
    else:
        os.environ.pop("MINIDINO_TUTORIAL_FAST", None)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    with tqdm(total=n_code, desc=name, unit="cell", dynamic_ncols=True) as bar:
        client = nbclient.NotebookClient(
            nb,
            timeout=3600,
            kernel_name="python3",
            resources={"metadata": {"path": HERE}},
            on_cell_executed=lambda **_: bar.update(1),
        )
        start = time.perf_counter()
        client.execute()
    return nb, time.perf_counter() - start


def settle(text: str) -> str:
    """A stream's text as a terminal shows it: of the rewrites of a line by carriage returns (progress bars)
    only the last is kept, so a stored notebook holds one line per bar instead of every update."""
    return "\n".join(
        line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line for line in text.split("\n")
    )


def store(nb, name: str, seconds: float) -> int:
    """Write the executed notebook with its provenance (progress bars settled); returns its size in bytes."""
    import nbformat

    for cell in nb.cells:
        merged = []  # a progress bar arrives as one output per update: one output per stream run instead
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else {}
            if out.get("output_type") == "stream" == last.get("output_type") and out["name"] == last["name"]:
                last["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = settle(out["text"])
        if cell.cell_type == "code":
            cell.outputs = merged

    nb.metadata["minidino"] = {
        "code_sha256": code_hash(nb),
        "mode": "full",
        "executed": datetime.date.today().isoformat(),
        "seconds": round(seconds),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    path = os.path.join(HERE, name)
    nbformat.write(nb, path)
    return os.path.getsize(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "prefixes", nargs="*", help="run only the notebooks whose names start with these (e.g. 05)"
    )
    p.add_argument("--fast", action="store_true", help="the test suite's quick mode; writes nothing")
    args = p.parse_args(argv)
    for name in notebooks(args.prefixes):
        nb, seconds = execute(name, args.fast)
        if args.fast:
            print(f"{name}: ran in {seconds:.0f} s (fast mode, not stored)")
            continue
        size = store(nb, name, seconds)
        warn = (
            f"  over the {MAX_BYTES / 1e6:.1f} MB limit: make its figures smaller" if size > MAX_BYTES else ""
        )
        print(f"{name}: {seconds:.0f} s, {images(nb)} images, {size / 1e6:.2f} MB{warn}")


if __name__ == "__main__":
    sys.exit(main())
