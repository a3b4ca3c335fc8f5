"""The executable snippets of docs/interop.rst, for the adapter tests to run as written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

INTEROP = Path(__file__).resolve().parent.parent / "docs" / "interop.rst"


def interop_snippets(group):
    """The bodies of the ``.. testcode:: <group>`` blocks of docs/interop.rst, in order."""
    pattern = re.compile(r"^\.\. testcode:: " + re.escape(group)
                         + r"\n((?:   :.*\n)*)\n((?:(?:   .*)?\n)+)", re.MULTILINE)
    return [textwrap.dedent(match.group(2)) for match in pattern.finditer(INTEROP.read_text())]


def run_interop_snippets(group):
    """Execute a group's snippets in one namespace (as Sphinx's doctest builder does)."""
    snippets = interop_snippets(group)
    assert snippets, f"docs/interop.rst has no '.. testcode:: {group}' block"
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, str(INTEROP), "exec"), namespace)
    return namespace
