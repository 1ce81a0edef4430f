"""The configuration reference is generated from the settings model and kept in docs/."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from postroom.cli import app
from postroom.settings import Settings, reference
from tests.conftest import ROOT

DOC = ROOT / "docs" / "configuration.md"
REGENERATE = ".venv/bin/postroom config-reference > docs/configuration.md"


def test_docs_configuration_md_is_current():
    assert DOC.read_text() == reference(), (
        f"docs/configuration.md is stale: the settings model changed. Regenerate it with\n"
        f"    {REGENERATE}\nand commit the result."
    )


def test_the_command_prints_the_reference():
    result = CliRunner().invoke(app, ["config-reference"], env={"POSTROOM_DATABASE_URL": "x"})
    assert result.exit_code == 0
    assert result.output == reference()


def test_every_setting_has_one_row_with_type_default_and_description():
    rows = re.findall(r"^\| `(POSTROOM_[A-Z_]+)` \| (.+?) \| (.+?) \| (.+?) \|$", reference(), re.M)
    variables = [row[0] for row in rows]
    expected = [
        "POSTROOM_" + (field.alias or name).upper() for name, field in Settings.model_fields.items()
    ]
    assert variables == expected
    table = {row[0]: row[1:] for row in rows}
    assert table["POSTROOM_DATABASE_URL"][:2] == ("string, secret", "required")
    assert table["POSTROOM_HEALTH_PORT"][:2] == ("integer, >= 0, <= 65535", "unset")
    assert table["POSTROOM_LOG_FORMAT"][:2] == ("one of `auto`, `json`, `console`", "`auto`")
    assert table["POSTROOM_NOTIFY"][:2] == ("boolean", "`true`")
    assert table["POSTROOM_CRASH_AT"][1] == "unset"
    assert all(description.strip() for _, _, description in table.values())
