"""The reading budgets (STYLE.md) as checks that fail when a change breaks them: the README at most 2,100
words (its target is 2,000), every Python file at most 400 lines and every function at most 80, train_step
at most 45, and no import circle among the package's modules, the kernels and the scripts."""

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sorted(
    f for pattern in ("minidino/**/*.py", "kernels/*.py", "*.py", "benchmarks/*.py", "tutorials/*.py", "tests/*.py")
    for f in glob.glob(os.path.join(ROOT, pattern), recursive=True)
)  # fmt: skip


def _words(path: str) -> int:
    return len(re.findall(r"\S+", open(path, encoding="utf-8").read()))


def test_the_readme_keeps_its_word_budget():
    assert _words(os.path.join(ROOT, "README.md")) <= 2100


def test_every_file_and_function_keeps_its_size():
    too_long = [(os.path.relpath(f, ROOT), n) for f in PY if (n := sum(1 for _ in open(f))) > 400]
    assert not too_long, f"files over 400 lines: {too_long}"
    long_functions, step = [], None
    for f in PY:
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 80:
                    long_functions.append((os.path.relpath(f, ROOT), node.name, size))
                if node.name == "train_step" and f.endswith("train.py") and os.path.dirname(f) == ROOT:
                    step = size
    assert not long_functions, f"functions over 80 lines: {long_functions}"
    assert step is not None and step <= 45, f"train_step is {step} lines (signature and docstring included)"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    rel = rel.replace("kernels.", "minidino.kernels.", 1) if rel.startswith("kernels.") else rel
    return rel.removesuffix(".__init__")


def _imports(path: str, name: str, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports, at the top or inside functions."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def test_no_import_circle():
    files = [f for f in PY if "/tests/" not in f and "/benchmarks/" not in f and "/tutorials/" not in f]
    names = {_module_name(f): f for f in files}
    graph = {n: _imports(f, n, set(names)) for n, f in names.items()}
    state, path = {}, []

    def visit(n):  # depth-first search; a module met again while on the path closes a circle
        state[n] = "open"
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m) :] + [m]))
            if m not in state:
                visit(m)
        state[n] = "done"
        path.pop()

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert {"minidino.kernels.attention_host", "minidino.kernels.launch"} <= graph[
        "minidino.kernels.attention"
    ]
    assert {"minidino.cli", "minidino.checkpoint"} <= graph["train"]  # the scripts' imports are resolved too


def test_the_reading_path_gives_the_files_sizes():
    """README's "Read the code" names files with their line counts: `path` (N ...; within 10 lines of today's."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Read the code") :].split("\n## ")[0]
    sizes = re.findall(r"`([\w/]+\.py)`,? \((\d+)", section)
    assert len(sizes) >= 8
    for path, n in sizes:
        actual = sum(1 for _ in open(os.path.join(ROOT, path)))
        assert abs(actual - int(n)) <= 10, f"README says {path} has {n} lines; it has {actual}"
