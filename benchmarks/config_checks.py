"""How much of the code is hand-written config checking: `raise ConfigError` sites and the lines that check.

Not a speed goal: the figure issue 26 ("signatures are the schema") is measured by. A check line is a line from the
nearest `if` whose body holds a `raise ConfigError(...)` down to the end of that raise (a raise outside an `if`
counts its own lines); code lines are lines with a token that is not a comment.

    python -m benchmarks.config_checks segplat                      # whole package: per file, then the total
    python -m benchmarks.config_checks segplat/models segplat/losses segplat/optim.py
    git worktree add /tmp/before REV && python -m benchmarks.config_checks /tmp/before/segplat   # an older tree
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

STOP = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.With, ast.Try)


def code_lines(source: str) -> int:
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def _raises_config_error(node: ast.AST) -> bool:
    if not isinstance(node, ast.Raise) or node.exc is None:
        return False
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return (exc.id if isinstance(exc, ast.Name) else getattr(exc, "attr", "")) == "ConfigError"


def count(source: str) -> tuple[int, int, int]:
    """(raise ConfigError sites, check lines, code lines) of one module."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    sites, lines = 0, set()
    for node in ast.walk(tree):
        if not _raises_config_error(node):
            continue
        sites += 1
        start, up = node.lineno, parents.get(node)
        while up is not None and not isinstance(up, STOP):
            if isinstance(up, ast.If) and any(node in ast.walk(s) for s in up.body):
                start = up.lineno
                break
            up = parents.get(up)
        lines.update(range(start, node.end_lineno + 1))
    return sites, len(lines), code_lines(source)


def main(paths: list[str]) -> None:
    files = sorted({f for p in paths for f in ([Path(p)] if p.endswith(".py") else Path(p).rglob("*.py"))})
    total = [0, 0, 0]
    for file in files:
        figures = count(file.read_text())
        total = [a + b for a, b in zip(total, figures)]
        if figures[0]:
            print(f"{figures[0]:4d} {figures[1]:5d} {figures[2]:6d}  {file}")
    share = 100 * total[1] / max(total[2], 1)
    print(f"{total[0]:4d} {total[1]:5d} {total[2]:6d}  total: raise ConfigError sites, check lines, code lines "
          f"({share:.1f} % checks)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["segplat"])
