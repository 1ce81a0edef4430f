"""The guides cannot rot: their code is type-checked with mypy --strict and run.

A fenced block whose first line is ``# file: some/path`` is a file of the guide's
project; each guide's files are written to a fresh directory (packages get an empty
``__init__.py``), type-checked as a whole, and the guide's tests run there with pytest
against this run's test database, through the guide's own conftest. A ``python`` block
without a file line is a snippet, type-checked on its own. ``postroom`` commands in
``bash`` blocks must exist, and ``postroom asyncapi`` ones are run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from postroom.cli import app
from tests.conftest import ROOT
from tests.test_asyncapi import validate_asyncapi

GUIDES = ["five-minute-consumer.md", "testing.md"]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_LINE = re.compile(r"^# file: (\S+)\n")
MYPY_INI = """\
[mypy]
strict = True
plugins = pydantic.mypy
ignore_missing_imports = True
cache_dir = {cache}

[mypy-postroom.*,sqlalchemy.*,pydantic.*,pytest.*]
ignore_missing_imports = False
"""


def blocks(guide: str, language: str) -> list[str]:
    text = (ROOT / "docs" / guide).read_text(encoding="utf-8")
    return [code for lang, code in FENCE.findall(text) if lang == language]


def write_project(guide: str, root: Path) -> list[Path]:
    """Write the guide's files (and its snippets) under *root*; return the Python files."""
    written: list[Path] = []
    for language in ("python", "toml"):
        for index, code in enumerate(blocks(guide, language)):
            match = FILE_LINE.match(code)
            if match is None:
                assert language == "python", f"{guide}: a toml block without a # file: line"
                path = root / f"snippet_{index}.py"
            else:
                path = root / match.group(1)
                assert not path.exists(), f"{guide}: {match.group(1)} is written twice"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(code, encoding="utf-8")
            if path.suffix == ".py":
                written.append(path)
    for package in {p.parent for p in written} - {root}:
        (package / "__init__.py").touch()
    return written


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_code_type_checks_strictly(guide, tmp_path):
    files = write_project(guide, tmp_path)
    assert files, f"{guide} has no python blocks"
    cache = ROOT / ".mypy_cache" / "docs"
    (tmp_path / "mypy.ini").write_text(MYPY_INI.format(cache=cache))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mypy on the code of docs/{guide}:\n{result.stdout}"


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_tests_pass_against_the_database(guide, tmp_path, database_url):
    files = write_project(guide, tmp_path)
    tests = [f for f in files if f.name.startswith("test_")]
    expected = sum(f.read_text().count("\nasync def test_") for f in tests)
    assert expected >= 2, f"{guide} should show at least two tests"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTROOM_", "PYTEST_"))}
    env["TEST_DATABASE_URL"] = database_url
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"the tests of docs/{guide} failed:\n{result.stdout[-4000:]}"
    assert f"{expected} passed" in result.stdout, result.stdout[-2000:]
    output = result.stdout + result.stderr
    assert "Warning" not in output, f"docs/{guide}'s tests warn:\n{output[-3000:]}"


def test_postroom_commands_in_the_guides_exist_and_asyncapi_runs(tmp_path):
    commands = {info.name or info.callback.__name__ for info in app.registered_commands}
    write_project("five-minute-consumer.md", tmp_path)
    ran = 0
    for guide in GUIDES:
        for block in blocks(guide, "bash"):
            for line in block.splitlines():
                words = shlex.split(line.split("#", 1)[0])
                if not words or words[0] != "postroom":
                    continue
                assert words[1] in commands, f"docs/{guide}: no command `postroom {words[1]}`"
                if words[1] == "asyncapi" and guide == "five-minute-consumer.md":
                    result = subprocess.run(
                        [sys.executable, "-m", "postroom", *words[1:]],
                        cwd=tmp_path,
                        env={k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")},
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    assert result.returncode == 0, result.stderr
                    output = words[words.index("--output") + 1]
                    validate_asyncapi(json.loads((tmp_path / output).read_text()))
                    ran += 1
    assert ran == 1, "the guide's `postroom asyncapi` command was not found"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_links_between_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).resolve().exists():
                missing.append(f"{page.name} -> {target}")
    assert not missing, missing


def test_the_docs_stay_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = [p.name for p in pages if "../shared" in p.read_text(encoding="utf-8")]
    assert not outside, f"these pages point outside the repository: {outside}"
