"""The user documentation stays true to the tool: every option documented, every quoted result file committed."""

from __future__ import annotations

import re

import pytest

from onnx_intrafusion.cli import build_parser

from conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}


def _flags() -> list[str]:
    return sorted({s for a in build_parser()._actions for s in a.option_strings
                   if s.startswith("--") and s not in ("--help",)})


def _usage_block() -> str:
    start = README.index("## Usage")
    return README[start:README.index("\n## ", start + 1)]


@pytest.mark.parametrize("flag", _flags())
def test_every_option_is_in_readme_usage_and_reference(flag):
    assert re.search(re.escape(flag) + r"\b", _usage_block()), f"{flag} missing from README's usage block"
    assert re.search(re.escape(flag) + r"\b", DOCS["reference.md"]), f"{flag} missing from docs/reference.md"


def test_every_quoted_result_file_is_committed():
    quoted = set(re.findall(r"docs/results/[\w./-]+\.(?:json|png)", README + "".join(DOCS.values())))
    assert quoted
    missing = sorted(q for q in quoted if not (ROOT / q).exists())
    assert not missing, f"quoted but not committed: {missing}"


@pytest.mark.parametrize("name", sorted(DOCS) + ["README.md"])
def test_docs_are_for_users_not_hand_over_notes(name):
    text = README if name == "README.md" else DOCS[name]
    for marker in ("for the lead", "to merge", "Issue #", "branch `", "merge notes", "(branch"):
        assert marker.lower() not in text.lower(), f"{name} reads like a hand-over note: '{marker}'"
