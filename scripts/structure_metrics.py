"""Size and complexity of the code a maintainer reads: the table of issue 14's closing note.

Prints JSON: the largest files, the longest functions, the most complex ones (McCabe, as
ruff's C901 counts it) and totals. Generated protobuf code, migrations and tests are left out.

    .venv/bin/python scripts/structure_metrics.py [--top 10] [ROOT]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

FOLDERS = ("server", "cli", "partners", "privacy", "sdk")
SKIP = re.compile(r"(_pb2(_grpc)?\.pyi?$)|(/migrations/)")
C901 = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+):\d+: C901 "
    r"`(?P<name>[^`]+)` is too complex \((?P<score>\d+) > 0\)"
)


def sources(root: Path) -> list[Path]:
    """Production Python files under the project's folders."""
    files = [p for f in FOLDERS for p in sorted((root / f).rglob("*.py")) if (root / f).is_dir()]
    return [p for p in files if not SKIP.search(p.as_posix())]


def functions(path: Path, root: Path) -> list[dict[str, object]]:
    """Every function and method with its length in lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[dict[str, object]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            out.append(
                {
                    "where": f"{path.relative_to(root)}:{node.lineno}",
                    "name": node.name,
                    "lines": length,
                }
            )
    return out


def complexity(root: Path, files: list[Path]) -> list[dict[str, object]]:
    """McCabe complexity of every function, from ruff (the project's own linter)."""
    ruff = Path(sys.executable).with_name("ruff")
    run = subprocess.run(
        [
            str(ruff),
            "check",
            "--no-cache",
            "--isolated",
            "--select",
            "C901",
            "--config",
            "lint.mccabe.max-complexity=0",
            "--output-format",
            "concise",
            *[str(f.relative_to(root)) for f in files],
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    out = []
    for line in run.stdout.splitlines():
        m = C901.match(line)
        if m:
            out.append(
                {
                    "where": f"{m['path']}:{m['line']}",
                    "name": m["name"],
                    "complexity": int(m["score"]),
                }
            )
    return out


def main() -> None:
    """Measure ROOT (default: this checkout) and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    files = sources(root)
    sizes = sorted(
        (
            {"file": str(p.relative_to(root)), "lines": len(p.read_text().splitlines())}
            for p in files
        ),
        key=lambda r: -int(r["lines"]),
    )
    funcs = sorted((f for p in files for f in functions(p, root)), key=lambda r: -int(r["lines"]))
    cc = sorted(complexity(root, files), key=lambda r: -int(r["complexity"]))
    print(
        json.dumps(
            {
                "files": len(files),
                "lines": sum(int(s["lines"]) for s in sizes),
                "files_over_400_lines": sum(1 for s in sizes if int(s["lines"]) > 400),
                "functions": len(funcs),
                "functions_over_50_lines": sum(1 for f in funcs if int(f["lines"]) > 50),
                "functions_over_complexity_15": sum(1 for c in cc if int(c["complexity"]) > 15),
                "largest_files": sizes[: args.top],
                "longest_functions": funcs[: args.top],
                "most_complex": cc[: args.top],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
