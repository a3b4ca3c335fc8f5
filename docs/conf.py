"""Sphinx configuration of the pysparse_attn documentation.

``make docs`` builds HTML and runs the doctests, both with warnings as errors. The measured
per-method tables of "Choosing a method" are generated here, at build time, from the result
files in ``bench/results/`` (the ``measured-methods`` directive below), and so is the table of
plan-reuse runs of "Plan reuse across denoising steps" (``measured-reuse``). Intersphinx links
to NumPy and CuPy need their inventories from the network, which CI does not have: they are off
unless ``PYSPARSE_ATTN_INTERSPHINX=1`` is set (references to NumPy/CuPy then render as plain
text instead of links; nothing else changes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pysparse_attn  # noqa: E402  (after the path is set, for builds from a plain clone)
from docutils import nodes  # noqa: E402
from docutils.parsers.rst import Directive  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402

project = "pysparse_attn"
author = "pysparse_attn developers"
copyright = "2026, pysparse_attn developers"
release = pysparse_attn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

if os.environ.get("PYSPARSE_ATTN_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "cupy": ("https://docs.cupy.dev/en/stable/", None),
    }

templates_path = []
exclude_patterns = ["_build", "examples", "generated/*.examples", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "auto_examples/*.json",
                    "auto_examples/*.md5", "auto_examples/*.pickle"]

html_theme = "furo"
html_title = f"pysparse_attn {release}"

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"  # numpydoc sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

doctest_global_setup = """
import numpy as np
import pysparse_attn as psa
"""

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    # CPU-only examples; each must finish in seconds (tests/test_docs.py builds them).
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
}


class MeasuredMethods(Directive):
    """``.. measured-methods:: FOLDER``: per-method tables of the result records in the
    ``*.jsonl`` files of ``FOLDER`` (relative to this folder), rendered by
    :func:`pysparse_attn.bench.results.render_method_tables`."""

    required_arguments = 1

    def run(self):
        from pysparse_attn.bench.results import read_results, render_method_tables

        env = self.state.document.settings.env
        folder = (Path(env.srcdir) / self.arguments[0]).resolve()
        paths = sorted(folder.glob("*.jsonl"))
        for path in paths:
            env.note_dependency(str(path))
        text = render_method_tables(read_results(paths))
        container = nodes.container()
        self.state.nested_parse(StringList(text.splitlines(), source=str(folder)),
                                self.content_offset, container)
        return container.children


class MeasuredReuse(Directive):
    """``.. measured-reuse:: FOLDER``: the totals of the plan-reuse runs (``reuse-*.jsonl``)
    in ``FOLDER``, GPU runs first, rendered by
    :func:`pysparse_attn.bench.reuse.render_reuse_results`."""

    required_arguments = 1

    def run(self):
        from pysparse_attn.bench.reuse import render_reuse_results

        env = self.state.document.settings.env
        folder = (Path(env.srcdir) / self.arguments[0]).resolve()
        for path in sorted(folder.glob("reuse-*.jsonl")):
            env.note_dependency(str(path))
        container = nodes.container()
        self.state.nested_parse(StringList(render_reuse_results(folder).splitlines(),
                                           source=str(folder)), self.content_offset, container)
        return container.children


def _reread_measured(app, env, added, changed, removed):
    # A result file added to bench/results/ changes no source file: re-read the pages that
    # use the directive on every build (one page, cheap) so their tables are never stale.
    return [name for name in sorted(env.found_docs) if name not in removed
            and any(f".. measured-{kind}::" in Path(env.doc2path(name)).read_text()
                    for kind in ("methods", "reuse"))]


def setup(app):
    app.add_directive("measured-methods", MeasuredMethods)
    app.add_directive("measured-reuse", MeasuredReuse)
    app.connect("env-get-outdated", _reread_measured)
    return {"parallel_read_safe": True}
