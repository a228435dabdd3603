"""The README and the docs link only to files that exist, and name only commands and result files that exist."""

import json
import re
import shlex
import subprocess
import sys
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


def test_the_documentation_site_builds_with_warnings_as_errors(tmp_path):
    """MkDocs in strict mode: a broken link or anchor, a page missing from the nav, or an API entry that names
    nothing that exists fails the build (the hook in `docs/_hooks` roots every file at its repository path)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "docs" / "api" / "index.html").read_text()
    for name in ("SNIPPruning", "sparsify", "save_compressed", "restore_structure", "export_onnx"):
        assert f'id="lightning_snip.{name}"' in api, name


NAMED_RESULTS = re.compile(r"(?:examples|benchmarks)/results/[\w/.-]+")
LINKED_PAGE = re.compile(r"\]\(([\w/.-]+\.md)(?:#[\w-]+)?\)")
FIGURE = re.compile(r"(?<![\w.])(\d+(?:,\d{3})*\.\d+)(%|x)(?!\w)")  # a measured figure: decimals, then % or x
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _values(node, out: set[float]) -> None:
    """Every number in a JSON document, plus the ratios between the byte counts of one record (a size over a size)."""
    if isinstance(node, dict):
        numbers = [float(v) for v in node.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out.update(numbers)
        sizes = [float(v) for v in node.values() if isinstance(v, int) and not isinstance(v, bool) and v >= 1000]
        out.update(a / b for a in sizes for b in sizes)
        for value in node.values():
            _values(value, out)
    elif isinstance(node, list):
        for value in node:
            _values(value, out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out.add(float(node))


def _results_values(path: Path) -> set[float]:
    if not path.exists():
        return set()  # a missing file is the link test's failure
    files = sorted(p for p in path.rglob("results*") if p.suffix in (".json", ".md")) if path.is_dir() else [path]
    out: set[float] = set()
    for file in files:
        if file.suffix == ".json":
            _values(json.loads(file.read_text()), out)
        else:
            out.update(float(n.replace(",", "")) for n in NUMBER.findall(file.read_text()))
    return out


def _named_results(page: Path) -> set[Path]:
    text = page.read_text()
    named = {(ROOT / n.rstrip(".")).resolve() for n in NAMED_RESULTS.findall(text)}
    linked = {(page.parent / n).resolve() for n in LINKED_PAGE.findall(text)}
    named |= {p for p in linked if "results" in p.parts}
    return {p for p in named if p.is_dir() or p.suffix in (".json", ".md")}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "CHANGELOG.md"], ids=lambda p: p.name)
def test_every_figure_in_a_table_comes_from_a_results_file_the_page_names(page):
    """A table's measured figures (a number with decimals followed by % or x) must appear, to their printed precision,
    in a results file the page names, or, for a row that links to another page, in one that page names: a re-run that
    changes them, or a figure typed by hand, shows."""
    own = set().union(*(_results_values(source) for source in _named_results(page)))
    unsourced = []
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            continue
        pages = [(page.parent / link).resolve() for link in LINKED_PAGE.findall(line)]
        pages = [p for p in pages if p.parent.name == "docs" and p.exists()]
        values = set().union(*(_results_values(s) for p in pages for s in _named_results(p))) if pages else own
        for number, unit in FIGURE.findall(line):
            figure = float(number.replace(",", ""))
            tolerance = 0.5 * 10 ** -len(number.split(".")[1]) + 1e-9
            candidates = (v for value in values for v in ((value, 100 * value) if unit == "%" else (value,)))
            if not any(abs(c - figure) <= tolerance for c in candidates):
                unsourced.append(f"{number}{unit} in `{line[:70]}...`")
    assert not unsourced, f"{page.name}: figures no named results file holds: {unsourced}"


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(python [^`]+)`")
# Parse the documented arguments exactly as the script would, then stop before any work: argparse scripts through a
# patched `parse_args`; LightningCLI scripts through `--print_config`, which validates the whole config. Every
# command runs in one Python process (each script afresh through `runpy`), so torch and Lightning load once.
PARSE_ALL = """
import argparse, contextlib, io, json, runpy, sys
original = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    original(self, args, namespace)
    print("PARSED")
    sys.exit(0)
results = []
for script, args, cli in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    argparse.ArgumentParser.parse_args = original if cli else parse_and_stop
    sys.argv = [script, *args]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException as error:
            code = 1
            print(repr(error), file=sys.stderr)
    results.append({"code": code, "stdout": out.getvalue()[-2000:], "stderr": err.getvalue()[-3000:]})
argparse.ArgumentParser.parse_args = original
sys.stdout.write("RESULTS" + json.dumps(results) + "\\n")
"""


def documented_commands() -> list[tuple[str, str]]:
    """Every `python <script>.py ...` command in the README and the docs, as (page, command)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        shell = [block for language, block in FENCE.findall(text) if language in ("", "bash", "sh", "console")]
        snippets = [line for block in shell for line in block.replace("\\\n", " ").splitlines()]
        snippets += [" ".join(span.split()) for span in INLINE.findall(text)]
        for snippet in snippets:
            for part in snippet.split("&&"):
                command = part.split("#", 1)[0].strip()
                if re.match(r"python [\w/.-]+\.py\b", command):
                    found.append((page.name, command))
    return sorted(set(found))


def test_the_docs_name_the_commands_users_run():
    commands = {command for _, command in documented_commands()}
    assert "python examples/train.py fit --config examples/configs/lenet300_snip.yaml" in commands
    assert any(command.startswith("python benchmarks/sparse_inference.py") for command in commands)
    assert len(commands) >= 20


def _job(command: str) -> tuple[str, list[str], bool]:
    argv = shlex.split(command)[1:]
    script = ROOT / argv[0]
    cli = "LightningCLI" in script.read_text()
    return str(script), [*argv[1:], "--print_config"] if cli else argv[1:], cli


@pytest.fixture(scope="module")
def parsed_commands() -> dict[str, dict[str, object]]:
    """Every documented command parsed by its script, all in one subprocess: command -> exit code and output."""
    commands = sorted({c for _, c in documented_commands() if (ROOT / shlex.split(c)[1]).exists()})
    done = subprocess.run(
        [sys.executable, "-c", PARSE_ALL, json.dumps([_job(c) for c in commands])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS")), None)
    assert line is not None, f"the parsing process failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return dict(zip(commands, json.loads(line[len("RESULTS") :]), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("page", "command"), documented_commands(), ids=lambda v: v[:80])
def test_every_documented_command_parses_as_written(page, command, parsed_commands):
    """Each documented command's arguments are accepted by its script (the quick forms run in test_examples.py)."""
    script = ROOT / shlex.split(command)[1]
    assert script.exists(), f"{page}: `{command}` names a missing script"
    done = parsed_commands[command]
    assert done["code"] == 0, f"{page}: `{command}` is refused:\n{done['stdout']}\n{done['stderr']}"
    out = str(done["stdout"])
    assert "PARSED" in out or "class_path" in out or "trainer:" in out


def test_the_release_has_a_dated_changelog_section():
    import lightning_snip

    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert lightning_snip.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), version
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{version}]")


def _message_templates() -> list[str]:
    """Every string literal in the package, f-strings with `…` where a value goes (adjacent literals joined)."""
    import ast

    templates = []
    for path in sorted((ROOT / "lightning_snip").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                templates.append(
                    "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)  # type: ignore[misc]
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                templates.append(node.value)
    return templates


def test_every_quoted_message_in_troubleshooting_is_raised_by_the_package():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    quotes = [row.split("|")[1].strip() for row in text.splitlines() if row.startswith("| ``")]
    assert len(quotes) >= 40
    templates = _message_templates()
    stale = []
    for quote in quotes:
        fragment = quote.split("``")[1].strip()
        if not any(fragment in template for template in templates):
            stale.append(fragment)
    assert not stale, f"docs/troubleshooting.md quotes messages the package no longer has: {stale}"
