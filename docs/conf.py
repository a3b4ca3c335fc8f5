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


def _method_tables(folder, paths):
    from pysparse_attn.bench.results import read_results, render_method_tables

    return render_method_tables(read_results(paths))


def _reuse_totals(folder, paths):
    from pysparse_attn.bench.reuse import render_reuse_results

    return render_reuse_results(folder)


def _forward_comparisons(folder, paths):
    from pysparse_attn.bench.results import render_forward_comparisons

    return render_forward_comparisons(folder)


def _forward_schedules(folder, paths):
    from pysparse_attn.bench.results import render_forward_comparisons

    return render_forward_comparisons(folder, mode="schedule")


def _reuse_model_totals(folder, paths):
    from pysparse_attn.bench.reuse import render_reuse_results

    return render_reuse_results(folder, MEASURED["reuse-model"][0],
                                title="Plan reuse on the trained model's attention",
                                command="python bench/reuse_on_model.py --out DIR")


def _finetune_runs(folder, paths):
    from pysparse_attn.bench.results import render_finetune_results

    return render_finetune_results(folder)


#: ``.. measured-KIND:: FOLDER`` (relative to this folder): KIND -> (the result files of FOLDER
#: it reads, its renderer). methods: per-method tables of the result records; reuse: the totals
#: of the plan-reuse runs, GPU first; reuse-model: those of bench/reuse_on_model.py, one folder
#: per run; finetune: the fine-tuning demonstration's runs; forward: the Hopper forward kernels
#: side by side; forward-schedule: the warp-specialised kernel's consumer schedules.
MEASURED = {"methods": ("*.jsonl", _method_tables),
            "reuse": ("reuse-*.jsonl", _reuse_totals),
            "reuse-model": ("reuse-model-*/reuse-model-*.jsonl", _reuse_model_totals),
            "finetune": ("**/finetune-sla-*.json", _finetune_runs),
            "forward": ("**/forward-compare-*.jsonl", _forward_comparisons),
            "forward-schedule": ("**/forward-schedule-*.jsonl", _forward_schedules)}


def measured_directive(kind):
    pattern, render = MEASURED[kind]

    class Measured(Directive):
        required_arguments = 1

        def run(self):
            env = self.state.document.settings.env
            folder = (Path(env.srcdir) / self.arguments[0]).resolve()
            paths = sorted(folder.glob(pattern))
            for path in paths:
                env.note_dependency(str(path))
            container = nodes.container()
            self.state.nested_parse(StringList(render(folder, paths).splitlines(),
                                               source=str(folder)), self.content_offset,
                                    container)
            return container.children

    Measured.__name__ = f"Measured_{kind}"
    return Measured


def _reread_measured(app, env, added, changed, removed):
    # A result file added to bench/results/ changes no source file: re-read the pages that
    # use a measured directive on every build (few pages, cheap) so their tables are never stale.
    return [name for name in sorted(env.found_docs) if name not in removed
            and any(f".. measured-{kind}::" in Path(env.doc2path(name)).read_text()
                    for kind in MEASURED)]


def setup(app):
    for kind in MEASURED:
        app.add_directive(f"measured-{kind}", measured_directive(kind))
    app.connect("env-get-outdated", _reread_measured)
    return {"parallel_read_safe": True}
