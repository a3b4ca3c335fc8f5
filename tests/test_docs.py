"""The documentation builds with warnings as errors and its doctests pass (what CI enforces)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install .[docs])")
pytest.importorskip("furo", reason="the docs extra is not installed (pip install .[docs])")
pytest.importorskip("numpydoc", reason="the docs extra is not installed (pip install .[docs])")
pytest.importorskip("sphinx_gallery",
                    reason="the docs extra is not installed (pip install .[docs])")


def sphinx(builder, out, doctrees):
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
         "-d", str(doctrees), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_docs_build_without_warnings_and_doctests_pass(tmp_path):
    html = sphinx("html", tmp_path / "html", tmp_path / "doctrees")
    assert html.returncode == 0, html.stdout[-4000:] + html.stderr[-4000:]
    assert (tmp_path / "html" / "theory.html").exists()
    # Same doctrees: the gallery examples are not run a second time.
    doctest = sphinx("doctest", tmp_path / "doctest", tmp_path / "doctrees")
    assert doctest.returncode == 0, doctest.stdout[-4000:] + doctest.stderr[-4000:]
