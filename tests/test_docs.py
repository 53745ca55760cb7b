"""The documentation stands alone: every relative link of the repository's Markdown resolves inside the
repository, and nothing the project ships points at files a clone does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=REPO,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / line for line in out.stdout.splitlines() if line]


def test_every_relative_markdown_link_resolves_inside_the_repository() -> None:
    pages = tracked("*.md")
    assert REPO / "README.md" in pages and any(p.parent.name == "docs" for p in pages)
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+://|^#|^mailto:", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or REPO.resolve() not in (path, *path.parents):
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_nothing_points_outside_the_clone() -> None:
    mentions = [f"{p.relative_to(REPO)}" for p in tracked("*.md", "*.py", "*.yaml", "*.sh", "*.sbatch", "*.toml")
                if p != Path(__file__) and "../shared" in p.read_text(errors="ignore")]
    assert mentions == []


def test_the_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert [p for p in pages if f"docs/{p}" not in readme] == []
