"""The longest functions and the largest files of a folder, as Markdown tables.

    python -m tests.code_stats app            # the ten longest functions and the ten largest files of app/
    python -m tests.code_stats app --top 20

A function's length is its lines from ``def`` (decorators included) to its last line; nested functions
count within their parent and are also listed themselves (a closure is code to read all the same).
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Function:
    path: str
    name: str  # qualified: "wire.on_generate"
    line: int
    length: int


def functions(path: Path, root: Path = ROOT) -> list[Function]:
    """Every function and method of a Python file, nested ones included, with its length in lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                name = f"{prefix}{child.name}"
                found.append(Function(str(path.relative_to(root)), name, start, child.end_lineno - start + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def report(folder: Path, top: int = 10, root: Path = ROOT) -> str:
    files = python_files(folder)
    every = [f for path in files for f in functions(path, root)]
    longest = sorted(every, key=lambda f: (-f.length, f.path, f.line))[:top]
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in files),
                   key=lambda item: (-item[0], item[1]))
    lines = [f"{len(files)} files, {sum(n for n, _ in sizes)} lines, {len(every)} functions; "
             f"functions over 60 lines: {sum(f.length > 60 for f in every)}; files over 450 lines: "
             f"{sum(n > 450 for n, _ in sizes)}", "",
             "| function | file:line | lines |", "| --- | --- | --- |"]
    lines += [f"| `{f.name}` | {f.path}:{f.line} | {f.length} |" for f in longest]
    lines += ["", "| file | lines |", "| --- | --- |"]
    lines += [f"| {name} | {count} |" for count, name in sizes[:top]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.code_stats", description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default="app", help="a folder of the repository (default app)")
    parser.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    args = parser.parse_args(argv)
    print(report(ROOT / args.folder, args.top))


if __name__ == "__main__":
    main()
