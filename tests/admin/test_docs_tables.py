"""The operator tables in the docs are the code's (issue 14 acceptance): every configuration key
(type, default, unit, environment name) in docs/operations.md, and the one exit-code table in
README.md and docs/operations.md, are exactly what tierstore/settings.py and
tierstore_admin/output.py generate. On a mismatch, paste the expected text the message shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tierstore.settings import KEYS, markdown_table
from tierstore_admin.output import EXIT_CODES, exit_codes_markdown

ROOT = Path(__file__).resolve().parents[2]


def _block(path: Path, marker: str) -> str:
    text = path.read_text()
    m = re.search(rf"<!-- {marker}:[^\n]*-->\n(.*?)\n<!-- end {marker} -->", text, re.S)
    assert m, f"{path.name} has no <!-- {marker}: ... --> ... <!-- end {marker} --> block"
    return m.group(1).strip()


def test_settings_table_in_operations_md_is_generated_from_the_keys():
    got = _block(ROOT / "docs" / "operations.md", "settings-table")
    want = markdown_table()
    assert got == want, "docs/operations.md settings table is stale; it should read:\n" + want
    assert len(got.splitlines()) == len(KEYS) + 2


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_exit_code_table_is_the_one_the_cli_uses(doc):
    got = _block(ROOT / doc, "exit-codes")
    want = exit_codes_markdown()
    assert got == want, f"{doc} exit-code table is stale; it should read:\n" + want
    assert [c for c, _, _ in EXIT_CODES] == [0, 1, 2, 3, 130]


def write_tables() -> None:
    """Rewrite the generated blocks: ``python tests/admin/test_docs_tables.py --write``."""
    for doc, marker, text in (("docs/operations.md", "settings-table", markdown_table()),
                              ("docs/operations.md", "exit-codes", exit_codes_markdown()),
                              ("README.md", "exit-codes", exit_codes_markdown())):
        p = ROOT / doc
        s = p.read_text()
        s = re.sub(rf"(<!-- {marker}:[^\n]*-->\n).*?(\n<!-- end {marker} -->)",
                   lambda m: m.group(1) + text + m.group(2), s, flags=re.S)
        p.write_text(s)


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        write_tables()
