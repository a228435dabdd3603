"""MkDocs hook: build the site from the repository root, so that every relative link works as it does on GitHub.

The pages live in `docs/` and link to `../examples/results/...`, `../benchmarks/...` and `../README.md`; the README
links to `docs/...`. This hook replaces MkDocs' file list with the README, the CHANGELOG, the pages under `docs/` and
every file those pages may link to (examples, benchmarks and their results), each at its path in the repository.
With `strict: true`, a link to a file that does not exist, or to an anchor that does not exist, fails the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
LINKED = ("examples", "benchmarks")
SKIP = {"__pycache__", ".ipynb_checkpoints"}


def _file(path: Path, config: Any) -> File:
    return File(path.relative_to(ROOT).as_posix(), str(ROOT), config["site_dir"], config["use_directory_urls"])


def on_files(files: Files, config: Any) -> Files:
    """Every page and linkable file at its repository path."""
    paths = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in LINKED:
        paths += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and not SKIP & set(p.parts))
    rooted = Files([_file(p, config) for p in paths])
    for file in files:  # the theme's and plugins' own static files
        if not file.src_uri.endswith(".md") and not file.src_uri.startswith("_hooks/"):
            rooted.append(file)
    return rooted
