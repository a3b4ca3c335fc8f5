"""The sweep: methods x settings x workloads, one JSONL record per run, resumable.

File format: one JSON object per line. ``{"type": "environment", ...}`` opens every session
(versions, machine, git commit, command); each run is ``{"type": "run", "key": ..., ...}``.
A run whose ``key`` is already in the file is not run again, so an interrupted sweep
continues where it stopped and a finished one is a no-op. A file workload is identified in the
key by the SHA-256 of its content, not by its path: overwrite the file with new tensors and its
runs are made again instead of being read back stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from .. import workloads as _workloads
from .methods import METHODS
from .results import git_commit
from .timing import time_rounds
from .metrics import (dense_reference, error_metrics, recall_from_tile_mass, recall_metrics,
                      sample_rows, sampled_reference)

__all__ = ["Workload", "WORKLOADS", "parse_workload", "environment", "run_key", "read_records",
           "run_sweep", "file_digest", "LayoutWarning", "DEFAULT_GPU_REFERENCE_ROWS", "to_backend"]

# Query rows (per batch and head) of the exact float32 reference on a GPU backend: enough for
# the error to be judged to well under 1% of itself, few enough for a Wan-shaped sweep to spend
# seconds, not minutes, on its reference.
DEFAULT_GPU_REFERENCE_ROWS = 2048

FILE_LAYOUTS = ("bhnd", "bnhd", "hnd", "nhd")
# The layout each one is mistaken for: same rank, N and H swapped.
_OTHER_LAYOUT = {"bhnd": "bnhd", "bnhd": "bhnd", "hnd": "nhd", "nhd": "hnd"}


class LayoutWarning(UserWarning):
    """A file workload whose shape suggests it was saved in the other axis order."""


def file_digest(path) -> str:
    """SHA-256 (hex) of a workload file's bytes, or of ``q.npy``, ``k.npy``, ``v.npy`` of a
    directory workload, in that order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"workload file does not exist: {path}")
    parts = [path / f"{name}.npy" for name in ("q", "k", "v")] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for part in parts:
        if not part.exists():
            raise FileNotFoundError(f"workload directory {path} has no {part.name}")
        with open(part, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()

# Named synthetic workloads. The "-small" ones keep the head dimension, head mix and frame
# count structure of Wan2.1 on a grid small enough for a CPU sweep of every method in minutes.
WORKLOADS = {
    "mixed-small": dict(shape=(9, 15, 26), heads=8, head_dim=128,
                        kinds=_workloads.HEAD_KINDS),
    "local-small": dict(shape=(9, 15, 26), heads=4, head_dim=128, kinds=("local",)),
    "temporal-small": dict(shape=(9, 15, 26), heads=4, head_dim=128, kinds=("temporal",)),
    "global-small": dict(shape=(9, 15, 26), heads=4, head_dim=128, kinds=("global",)),
    "diffuse-small": dict(shape=(9, 15, 26), heads=4, head_dim=128, kinds=("diffuse",)),
    # Wan2.1's 21 frames at a quarter of its 480p patch grid: 8,190 tokens, 128 key tiles.
    "mixed-mid": dict(shape=(21, 15, 26), heads=4, head_dim=128, kinds=_workloads.HEAD_KINDS),
    "mixed-wan2.1-480p": dict(shape="wan2.1-1.3b-480p", heads=4, head_dim=128,
                              kinds=_workloads.HEAD_KINDS),
}


@dataclass
class Workload:
    """Tensors of one workload and their exact dense reference, made on first use.

    Build with :func:`parse_workload`. Tensors and the dense reference are made on first use
    and kept; ``cache`` holds per-workload fitted parameters (SLA's projection).
    """

    name: str
    spec: dict
    dtype: str
    block: tuple
    seed: int = 0
    path: Optional[str] = None
    layout: str = "bhnd"
    layout_given: bool = False
    _tensors: Optional[tuple] = field(default=None, repr=False)
    _reference: object = field(default=None, repr=False)
    _digest: Optional[str] = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)

    def _make(self, seed):
        if self.path is not None:
            q, k, v = _workloads.load_qkv(self.path, layout=self.layout)
            self._check_layout(q.shape)
            return tuple(np.ascontiguousarray(x, dtype=np.dtype(self.dtype)) for x in (q, k, v))
        return _workloads.video_qkv(**self.spec, dtype=self.dtype, seed=seed)

    def _check_layout(self, shape):
        """Warn when the (B, H, N, D) read from the file has fewer tokens than heads."""
        _, heads, tokens, _ = shape
        if tokens >= heads:
            return
        other = _OTHER_LAYOUT[self.layout]
        how = "as given" if self.layout_given else "the default when no suffix is given"
        warnings.warn(
            f"workload {self.name}: read as {self.layout} ({how}) it has N = {tokens} tokens "
            f"but H = {heads} heads, which looks like the other axis order; if the file is "
            f"{other}, name it as file:{self.path}:{other}", LayoutWarning, stacklevel=3)

    def digest(self) -> Optional[str]:
        """SHA-256 of the file's content (None for a synthetic workload), computed once."""
        if self.path is not None and self._digest is None:
            self._digest = file_digest(self.path)
        return self._digest

    def identity(self) -> str:
        """What identifies the tensors in run keys: the content hash and layout of a file, the
        name (and seed, when not 0) of a synthetic workload."""
        if self.path is not None:
            return f"file:sha256={self.digest()[:20]}:{self.layout}"
        return self.name if self.seed == 0 else f"{self.name}@seed={self.seed}"

    def tensors(self):
        """``(q, k, v)`` in canonical layout and the workload's dtype, on the host."""
        if self._tensors is None:
            self._tensors = self._make(self.seed)
        return self._tensors

    def device_tensors(self, backend: str):
        """:meth:`tensors` where ``backend`` computes: on the GPU for ``"cupy"`` (moved once
        and kept, so timed calls include no transfer), else the host arrays."""
        if backend != "cupy":
            return self.tensors()
        if ("device", backend) not in self.cache:
            self.cache[("device", backend)] = tuple(to_backend(x, backend)
                                                    for x in self.tensors())
        return self.cache[("device", backend)]

    def reference(self, rows=None, backend="cpu"):
        """The :class:`~pysparse_attn.bench.metrics.DenseReference` of :meth:`tensors`.

        ``rows=None`` gives the float64 host reference over every row; an int samples that
        many query rows (per batch and head) for an exact float32 reference computed where
        ``backend`` computes. Made once; later calls return the first one.
        """
        if self._reference is None:
            if rows is None:
                self._reference = dense_reference(*self.tensors(), self.block)
            else:
                q, k, v = self.device_tensors(backend)
                picked = sample_rows(q.shape[2], rows, seed=self.seed)
                self._reference = sampled_reference(q, k, v, self.block, picked)
        return self._reference

    def fit_tensors(self, backend="cpu"):
        """``(q, k, v, reference)`` to fit parameters on: the workload's own tensors (where
        ``backend`` computes) and their :meth:`reference` (its rows, when sampled).

        Synthetic seeds draw new head content and value means, so a fit on another seed is a
        fit to another model; fitting in-sample is the optimistic bound a trained projection
        can approach, and records say ``"fit": "in-sample"``.
        """
        return (*self.device_tensors(backend), self.reference(backend=backend))

    def describe(self) -> dict:
        q = self.tensors()[0]
        info = {"workload": self.name, "shape_bhnd": list(q.shape), "dtype": self.dtype,
                "block": list(self.block), "seed": self.seed}
        if self.path is None:
            spec = dict(self.spec)
            spec["shape"] = list(_workloads._check_grid(spec["shape"]))
            spec["kinds"] = list(spec.get("kinds", _workloads.HEAD_KINDS))
            info["generator"] = spec
        else:
            info["file"] = self.path
            info["layout"] = self.layout
            info["content_sha256"] = self.digest()
        info["workload_id"] = self.identity()
        return info


def to_backend(x, backend: str, dtype=None):
    """Host array ``x`` (optionally converted to ``dtype``) where ``backend`` computes.

    On ``"cupy"`` a 16-bit result is rounded on the device from a float32 copy (exact for
    values already in that dtype; CuPy's own bfloat16 besides ml_dtypes'), which also spares the
    host a slow conversion; on host backends the host array, C-contiguous.
    """
    target = np.dtype(_workloads._check_dtype(dtype)) if dtype is not None else x.dtype
    if backend != "cupy":
        return np.ascontiguousarray(x, dtype=target)
    import cupy

    if target.itemsize == 2 or x.dtype.itemsize == 2:
        widened = cupy.asarray(np.ascontiguousarray(x, dtype=np.float32))
        return widened.astype(target)
    return cupy.asarray(np.ascontiguousarray(x, dtype=target))


def parse_workload(text: str, *, dtype="float32", block=(64, 64), seed=0) -> Workload:
    """A :class:`Workload` from a name in :data:`WORKLOADS`, ``file:PATH[:LAYOUT]`` or
    ``video:TxHxW:HEADS:HEAD_DIM:KIND+KIND[:SHARPNESS]``.

    Examples
    --------
    >>> from pysparse_attn.bench import parse_workload
    >>> parse_workload("video:4x6x8:2:32:local+diffuse").spec["kinds"]
    ('local', 'diffuse')
    """
    if text in WORKLOADS:
        return Workload(text, dict(WORKLOADS[text]), dtype, tuple(block), seed)
    if text.startswith("file:"):
        rest = text[len("file:"):]
        layout, given = "bhnd", False
        for candidate in FILE_LAYOUTS:
            if rest.endswith(":" + candidate):
                rest, layout, given = rest[: -len(candidate) - 1], candidate, True
        if not rest:
            raise ValueError(f"workload {text!r}: no path after 'file:'")
        if not Path(rest).exists():
            raise FileNotFoundError(f"workload {text!r}: file {rest} does not exist")
        return Workload(text, {}, dtype, tuple(block), seed, path=rest, layout=layout,
                        layout_given=given)
    if text.startswith("video:"):
        parts = text.split(":")
        if len(parts) not in (5, 6):
            raise ValueError(f"workload {text!r}: expected video:TxHxW:HEADS:HEAD_DIM:KINDS"
                             "[:SHARPNESS]")
        try:
            grid = tuple(int(s) for s in parts[1].split("x"))
            if len(grid) != 3:
                raise ValueError(f"the grid must be TxHxW, got {parts[1]!r}")
            spec = dict(shape=grid, heads=int(parts[2]), head_dim=int(parts[3]),
                        kinds=tuple(parts[4].split("+")))
            if len(parts) == 6:
                spec["sharpness"] = float(parts[5])
        except ValueError as error:
            raise ValueError(f"workload {text!r}: {error}") from error
        return Workload(text, spec, dtype, tuple(block), seed)
    raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, 'file:PATH[:LAYOUT]' or "
                     f"'video:TxHxW:HEADS:HEAD_DIM:KINDS[:SHARPNESS]', got {text!r}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _device(backend: str) -> str:
    if backend == "cupy":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            return props["name"].decode()
        except Exception as error:  # reported, not fatal: the header is informational
            return f"cupy device unknown ({type(error).__name__})"
    return f"{_cpu_model()} ({os.cpu_count()} logical cores)"


def environment(backend: str, argv=None) -> dict:
    """The environment header record: versions, machine, git commit, command, UTC time."""
    import numba

    from .. import __version__

    return {
        "type": "environment",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv if argv is None else argv),
        "pysparse_attn": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "backend": backend,
        "device": _device(backend),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }


def run_key(workload: str, method: str, value, block, backend: str, dtype: str) -> str:
    """The identity of one run in a results file (what resuming compares); ``workload`` is
    :meth:`Workload.identity`."""
    return f"{workload}|{method}|{value!r}|{block[0]}x{block[1]}|{backend}|{dtype}"


def read_records(paths):
    """All records of one or more JSONL files (a torn last line is ignored)."""
    records = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # an interrupted write; the run is redone on resume
    return records


def _resolve_reference_rows(reference_rows, backend):
    if reference_rows == "auto":
        return DEFAULT_GPU_REFERENCE_ROWS if backend == "cupy" else None
    if reference_rows is not None and (isinstance(reference_rows, bool)
                                       or not isinstance(reference_rows, int)
                                       or reference_rows < 2):
        raise ValueError(f"reference_rows must be 'auto', None or an int >= 2, got "
                         f"{reference_rows!r}")
    return reference_rows


def run_sweep(output, workloads, methods, *, backend="cpu", repeat=3, values=None,
              progress=True, argv=None, reference_rows="auto"):
    """Run every (workload, method, setting) not yet in ``output``; append JSONL records.

    Parameters
    ----------
    output : path
        JSONL file, created or appended to.
    workloads : list of Workload
    methods : list of str
        Names in :data:`~pysparse_attn.bench.methods.METHODS`.
    backend : str
        Backend of the timed calls (``"cpu"``, ``"cupy"``, ``"reference"``). With ``"cupy"``
        the tensors are moved to the GPU once and calls are timed by CUDA events, queued
        (:func:`~pysparse_attn.bench.timing.time_rounds`).
    repeat : int
        Timed rounds per run, each a dense call then the method's call (medians reported),
        after one untimed call of each.
    values : dict, optional
        Per method name, settings replacing the method's defaults.
    progress : bool
        tqdm progress bar on stderr.
    argv : list of str, optional
        The command recorded in the environment header (default ``sys.argv``).
    reference_rows : "auto", None or int
        Accuracy reference: None is exact float64 on the host over every row; an int is an
        exact float32 computation on that many sampled query rows, where the backend computes
        (:func:`~pysparse_attn.bench.metrics.sampled_reference`). ``"auto"`` (default): every
        row for host backends, :data:`DEFAULT_GPU_REFERENCE_ROWS` rows for ``"cupy"``.

    Returns
    -------
    int
        Number of runs performed (0 when everything was already in the file).
    """
    from tqdm import tqdm

    from .._api import attention

    for name in methods:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")
    reference_rows = _resolve_reference_rows(reference_rows, backend)
    values = values or {}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in read_records(output) if r.get("type") == "run"}
    plan = []
    for workload in workloads:
        for name in methods:
            for value in values.get(name, METHODS[name].values):
                key = run_key(workload.identity(), name, value, workload.block, backend,
                              workload.dtype)
                if key not in done:
                    plan.append((workload, name, value, key))
    if not plan:
        return 0
    header = environment(backend, argv)
    with open(output, "a") as sink:
        sink.write(json.dumps(header) + "\n")
        sink.flush()
        bar = tqdm(plan, file=sys.stderr, disable=not progress, unit="run")
        for workload, name, value, key in bar:
            bar.set_description(f"{workload.name} {name}={value}")
            q, k, v = workload.device_tensors(backend)
            reference = workload.reference(reference_rows, backend)
            method = METHODS[name]
            run = lambda: method.call(q, k, v, value, workload.block, backend, workload)  # noqa
            dense = lambda: attention(q, k, v, block=workload.block, backend=backend)  # noqa
            # Dense first in each round: the long call absorbs the round's start (queue empty).
            (dense_seconds, seconds), (_, (out, stats)), _ = time_rounds([dense, run], repeat,
                                                                         backend)
            recall = recall_from_tile_mass(reference, stats.kept)
            record = {
                "type": "run", "key": key, "method": name, "parameter": method.parameter,
                "value": value, "backend": backend, "device": header["device"],
                "date": header["date"], **workload.describe(),
                "reference": reference.description,
                "tile_sparsity": float(stats.sparsity),
                "flop_sparsity": float(stats.flop_sparsity),
                **recall_metrics(recall),
                **error_metrics(reference.restrict(out), reference.out),
                "time_s": seconds, "dense_time_s": dense_seconds,
                "speedup": dense_seconds / seconds,
                "repeat": repeat,
            }
            if name == "sla-fit":
                record["fit"] = "in-sample"
            if stats.recall_bound is not None and stats.bounded:
                record["recall_bound_min"] = float(stats.recall_bound.min())
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    return len(plan)


def summary(records, workloads, errors=None, metric="rel_l2", sparsity="tile_sparsity",
            fmt="markdown"):
    """The matched-error table of the runs of ``workloads`` in ``records`` (what the sweep
    command prints when it ends): by speedup when every run has a time, else by sparsity."""
    from .compare import DEFAULT_ERRORS, markdown_matched_error

    wanted = {w.identity() for w in workloads}
    runs = [r for r in records if r.get("type") == "run"
            and r.get("workload_id", r.get("workload")) in wanted]
    return markdown_matched_error(runs, errors or DEFAULT_ERRORS, metric, sparsity, fmt)
