"""The design contract lives in docs/design.rst: every citation of it in the sources points there
(a file outside the repository cannot be read by a user of the package)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("pysparse_attn", "gpu", "cpu", "tests", "docs", "bench")
           for p in (ROOT / folder).rglob("*")
           if p.suffix in {".py", ".pyx", ".cu", ".cuh", ".cpp", ".h", ".rst", ".sh"}
           and not {"generated", "auto_examples", "results", "__pycache__"} & set(p.parts)]
CONTRACT = "DESIGN" + ".md"  # spelled in two parts so that this file does not cite it


def test_the_design_contract_is_a_page_of_the_docs():
    text = (ROOT / "docs" / "design.rst").read_text()
    for section in ("3. Block scores", "5. Skip rules", "7. Gradients", "10. Errors"):
        assert section in text, f"docs/design.rst lacks its section {section!r}"


def test_citations_of_the_contract_point_into_the_repository():
    citing = [str(p.relative_to(ROOT)) for p in SOURCES + [ROOT / "README.md"]
              if CONTRACT in p.read_text(errors="replace")]
    assert SOURCES and not citing, f"cite docs/design.rst instead of {CONTRACT} in: {citing}"
