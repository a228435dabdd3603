"""The README and the docs link only to files that exist, and name only commands and result files that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_script_and_results_file_named_exists(page):
    text = page.read_text()
    named = set(re.findall(r"(?:examples|benchmarks)/[\w/.-]+\.(?:py|json|yaml|png|md)", text))
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, f"{page.name} names missing files: {missing}"


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    commands = [line for line in lines if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2  # one installs and runs the main job, one runs the tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in commands[1]
    assert commands[1].split("&& ", 1)[1] in ci
