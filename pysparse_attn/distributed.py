"""Sequence-parallel sparse attention over several devices: Ulysses and ring schemes.

Import it as ``pysparse_attn.distributed``; nothing here is re-exported by the package.

Two schemes split one attention call over the ranks of a communicator, each rank holding a
contiguous *sequence shard* of q, k and v (``(B, H, n_r, D)``, ranks in sequence order):

* :func:`ulysses_attention` (DeepSpeed-Ulysses): one all-to-all turns sequence shards into head
  shards (every rank gets the whole sequence for ``H / W`` heads), the rank runs the library's
  own :func:`pysparse_attn.attention` or :func:`pysparse_attn.sla_attention` on its heads with
  any selector, skip rule or SLA split, and a second all-to-all brings the output back to
  sequence shards. Per head nothing changes, so the result, the kept set and every statistic
  equal the single-device call's.
* :func:`ring_attention`: each rank keeps its query shard and visits the K/V shards of all ranks
  one after the other; every visit is one local sparse attention returning ``(O, LSE,
  recall_bound)`` through ``return_stats``, merged by LSE together with the certified-recall
  bookkeeping (see :func:`merge_recall`). The next shard's transfer is issued before the current
  one is computed. A plan may drop a whole remote shard (its transfer too) when the pooled
  block scores, exchanged first, say its mass is negligible.

Gradients: :func:`ulysses_attention_vjp` and :func:`ring_attention_vjp`, each with the forward's
kept set replayed (docs/design.rst section 7).

Communicators (:class:`Communicator`) wrap an existing engine, never a home-made transport:
a caller's ``torch.distributed`` process group (:class:`TorchCommunicator`), a
``cupy.cuda.nccl`` communicator (:class:`NcclCommunicator`), ``mpi4py``
(:class:`MpiCommunicator`), and :class:`LocalWorld`, ranks as threads of one process exchanging
array copies, for simulation (CI) and world size 1. Every exchange is one batch of
point-to-point sends and receives of raw bytes, so any dtype (bfloat16 included) travels.

NVLink multicast (NVLS) stays off wherever this module creates an NCCL communicator or is
asked to prepare a process for one (:func:`disable_nvlink_multicast`): on shared multi-GPU
hosts a program using it can take the host's GPUs out of service.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import _api
from ._plan import pool_tiles, tile_count
from ._select import BlockMask, TopK, TopP

__all__ = [
    "NVLINK_MULTICAST_OFF",
    "disable_nvlink_multicast",
    "Communicator",
    "LocalWorld",
    "TorchCommunicator",
    "NcclCommunicator",
    "MpiCommunicator",
    "merge_recall",
    "ulysses_attention",
    "ulysses_attention_vjp",
    "ring_attention",
    "ring_attention_vjp",
    "UlyssesStats",
    "RingStats",
]

#: Environment switches that keep NVLink multicast (NVLS / multimem) off in NCCL, PyTorch's
#: symmetric memory and NVSHMEM.
NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def disable_nvlink_multicast(environ=None):
    """Set :data:`NVLINK_MULTICAST_OFF` in ``environ`` (``os.environ`` by default).

    Call it before any NCCL communicator of the process exists (NCCL reads the variables when
    a communicator is created); :class:`NcclCommunicator` calls it itself. Values already set
    are overwritten: multicast stays off whatever the environment said.
    """
    environ = os.environ if environ is None else environ
    environ.update(NVLINK_MULTICAST_OFF)
    return environ


# --------------------------------------------------------------------------------------------
# Arrays: NumPy on the host, CuPy on the GPU; torch and other DLPack producers are viewed.
# --------------------------------------------------------------------------------------------

def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _namespace(x):
    if _is_cupy(x):
        import cupy

        return cupy
    return np


def _view(name, x):
    """``x`` as a NumPy or CuPy array (zero copy) and a function giving results back."""
    if isinstance(x, np.ndarray) or _is_cupy(x):
        return x, lambda y: y
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be an array (NumPy, CuPy or a DLPack producer), got "
                        f"{type(x).__name__}")
    device_type = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else 1
    if device_type == 2:  # kDLCUDA
        import cupy

        view = cupy.from_dlpack(x)
    else:
        view = np.from_dlpack(x)
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        import torch

        return view, lambda y: torch.from_dlpack(y)
    return view, lambda y: y


def _as_bhnd(x, layout):
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    return x if layout == "bhnd" else x.swapaxes(1, 2)


def _accumulator(xp, dtype):
    return xp.float64 if dtype == xp.float64 else xp.float32


def _contiguous(xp, x):
    return xp.ascontiguousarray(x)


def _bytes_of(xp, x):
    """A flat uint8 view of a contiguous array (what every transport moves)."""
    return _contiguous(xp, x).reshape(-1).view(xp.uint8)


# --------------------------------------------------------------------------------------------
# Communicators
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recv:
    """One expected message: its shape, dtype, source rank and the namespace to allocate in."""

    shape: tuple
    dtype: Any
    source: int
    xp: Any = np


class Request:
    """An exchange in flight; :meth:`wait` returns the received arrays in the order asked."""

    def __init__(self, finish: Callable[[], list]):
        self._finish = finish
        self._result = None
        self.waited_s = 0.0

    def wait(self) -> list:
        if self._result is None:
            start = time.perf_counter()
            self._result = self._finish()
            self.waited_s = time.perf_counter() - start
        return self._result


_DONE = Request(lambda: [])


class Communicator(abc.ABC):
    """Point-to-point exchanges among ``size`` ranks; the collectives are built on them.

    A subclass implements :meth:`_start` (post every send and receive of one batch, return a
    function that completes them). Sends to oneself are copied here, without the transport.
    Messages between one pair of ranks match in the order they were posted, as in MPI and NCCL,
    so both sides must post a pair's messages in the same order.
    """

    rank: int
    size: int

    #: Bytes this rank handed to the transport, and how many messages (for stats and tests).
    bytes_sent: int = 0
    messages_sent: int = 0

    #: The transport moves device memory only (NCCL): host arrays (the schemes' small
    #: bookkeeping exchanges) travel through the current CUDA device and come back as NumPy.
    device_only: bool = False

    def start(self, sends: Sequence[tuple], recvs: Sequence[Recv]) -> Request:
        """Post ``sends`` (``(array, dest)`` pairs) and ``recvs``; return a :class:`Request`."""
        if not sends and not recvs:
            return _DONE
        if self.device_only and (any(isinstance(x, np.ndarray) for x, _ in sends)
                                 or any(r.xp is np for r in recvs)):
            return self._start_through_device(sends, recvs)
        local = [x for x, dest in sends if dest == self.rank]
        remote_sends = [(x, dest) for x, dest in sends if dest != self.rank]
        remote_recvs = [r for r in recvs if r.source != self.rank]
        for x, dest in remote_sends:
            if not 0 <= dest < self.size:
                raise ValueError(f"dest {dest} is not a rank of a world of {self.size}")
            self.bytes_sent += int(x.nbytes)
            self.messages_sent += 1
        if remote_sends or remote_recvs:
            finish = self._start([(_namespace(x), x, d) for x, d in remote_sends], remote_recvs)
        else:
            finish = list
        copies = iter([_namespace(x).array(x, copy=True) for x in local])

        def complete():
            arrived = iter(finish())
            out = [next(copies) if r.source == self.rank else next(arrived) for r in recvs]
            for r, y in zip(recvs, out):
                if tuple(y.shape) != tuple(r.shape) or y.dtype != r.dtype:
                    raise RuntimeError(f"rank {self.rank} expected {r.shape} {r.dtype} from "
                                       f"rank {r.source}, got {tuple(y.shape)} {y.dtype}")
            return out

        return Request(complete)

    def _start_through_device(self, sends, recvs):
        import cupy

        on_host = [r.xp is np for r in recvs]
        device_sends = [(cupy.asarray(x) if isinstance(x, np.ndarray) else x, d)
                        for x, d in sends]
        device_recvs = [dataclasses.replace(r, xp=cupy) if r.xp is np else r for r in recvs]
        inner = self.start(device_sends, device_recvs)

        def complete():
            return [y.get() if host else y for y, host in zip(inner.wait(), on_host)]

        return Request(complete)

    @abc.abstractmethod
    def _start(self, sends, recvs) -> Callable[[], list]:
        """Post ``sends`` (``(xp, array, dest)``) and ``recvs``; return the completion."""

    def exchange(self, sends, recvs) -> list:
        """:meth:`start` then wait."""
        return self.start(sends, recvs).wait()

    def allgather(self, x) -> list:
        """Every rank's ``x`` (same shape and dtype everywhere), in rank order."""
        xp = _namespace(x)
        sends = [(x, j) for j in range(self.size)]
        recvs = [Recv(tuple(x.shape), x.dtype, j, xp) for j in range(self.size)]
        return self.exchange(sends, recvs)

    def alltoall(self, chunks: Sequence, recvs: Sequence[Recv]) -> list:
        """Send ``chunks[j]`` to rank ``j``; receive ``recvs[i]`` (``source == i``) from each."""
        return self.exchange([(c, j) for j, c in enumerate(chunks)], recvs)

    def allreduce_sum(self, x):
        """Sum of ``x`` over ranks, in float64 for host arrays (small arrays only)."""
        parts = self.allgather(x)
        total = parts[0].astype(_accumulator(_namespace(x), x.dtype), copy=True)
        for p in parts[1:]:
            total += p
        return total


class _LocalComm(Communicator):
    def __init__(self, world: "LocalWorld", rank: int):
        self.world = world
        self.rank = rank
        self.size = world.size
        self.bytes_sent = 0
        self.messages_sent = 0

    def _start(self, sends, recvs):
        for xp, x, dest in sends:
            self.world._post(self.rank, dest, xp.array(x, copy=True))
        # Receives match messages in the order they are posted (as in MPI and NCCL), not in
        # the order they are waited for.
        tickets = [self.world._ticket(r.source, self.rank) for r in recvs]
        return lambda: [self.world._take(source, self.rank, n) for source, n in tickets]


class LocalWorld:
    """``size`` ranks in one process, as threads exchanging copies of arrays.

    For the CPU simulation in CI, for world size 1, and for a loop-over-shards run on one GPU.
    :meth:`run` calls ``fn(comm, *per_rank_args)`` once per rank, each on its own thread (the
    caller's thread when ``size == 1``), and returns the results in rank order; an exception in
    one rank aborts the others (no hang) and is re-raised.

    Parameters
    ----------
    size : int
        Number of ranks.
    timeout : float
        Seconds a rank waits for a message before giving up.
    """

    def __init__(self, size: int, timeout: float = 120.0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.timeout = timeout
        self._boxes = {}
        self._sent = {}
        self._tickets = {}
        self._cond = threading.Condition()
        self._failed = None
        self.comms = [_LocalComm(self, r) for r in range(size)]

    def _post(self, source, dest, x):
        with self._cond:
            n = self._sent.get((source, dest), 0)
            self._sent[(source, dest)] = n + 1
            self._boxes[(source, dest, n)] = x
            self._cond.notify_all()

    def _ticket(self, source, dest):
        with self._cond:
            n = self._tickets.get((source, dest), 0)
            self._tickets[(source, dest)] = n + 1
            return source, n

    def _take(self, source, dest, n):
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._failed is not None:
                    raise RuntimeError(f"rank {dest}: another rank failed ({self._failed!r})")
                if (source, dest, n) in self._boxes:
                    return self._boxes.pop((source, dest, n))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"rank {dest} waited {self.timeout} s for rank {source}")
                self._cond.wait(left)

    def run(self, fn, *per_rank_args, **kwargs):
        """``[fn(comm_r, *[a[r] for a in per_rank_args], **kwargs) for r]``, ranks concurrent.

        Each of ``per_rank_args`` is a sequence of ``size`` items, item ``r`` going to rank r.
        """
        for a in per_rank_args:
            if len(a) != self.size:
                raise ValueError(f"per-rank arguments need {self.size} items, got {len(a)}")
        self._failed = None
        self._boxes.clear()
        self._sent.clear()
        self._tickets.clear()
        results = [None] * self.size
        errors = [None] * self.size

        def body(r):
            try:
                results[r] = fn(self.comms[r], *[a[r] for a in per_rank_args], **kwargs)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors[r] = error
                with self._cond:
                    if self._failed is None:
                        self._failed = error
                    self._cond.notify_all()

        if self.size == 1:
            body(0)
        else:
            threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        first = next((e for e in errors if e is not None
                      and not (isinstance(e, RuntimeError) and "another rank failed" in str(e))),
                     next((e for e in errors if e is not None), None))
        if first is not None:
            raise first
        return results


class TorchCommunicator(Communicator):
    """A caller's ``torch.distributed`` process group (NCCL for CUDA arrays, gloo on CPU).

    Arrays travel as byte tensors viewed through DLPack (no copy); on CUDA the operations are
    queued on CuPy's current stream, and waiting makes that stream wait for them.

    Parameters
    ----------
    group : ProcessGroup, optional
        The default group when None. ``torch.distributed`` must be initialised.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.bytes_sent = 0
        self.messages_sent = 0
        self.device_only = str(dist.get_backend(group)).lower() == "nccl"

    def _global(self, rank):
        if self.group is None:
            return rank
        return self._dist.get_global_rank(self.group, rank)

    def _start(self, sends, recvs):
        import torch

        dist = self._dist
        on_gpu = any(xp is not np for xp, _, _ in sends) or any(r.xp is not np for r in recvs)
        buffers = []
        ops = []
        outs = []
        with self._cupy_stream(on_gpu):
            for xp, x, dest in sends:
                tensor = torch.from_dlpack(_bytes_of(xp, x))
                buffers.append(tensor)
                ops.append(dist.P2POp(dist.isend, tensor, self._global(dest), self.group))
            for r in recvs:
                out = r.xp.empty(r.shape, dtype=r.dtype)
                outs.append(out)
                tensor = torch.from_dlpack(out.reshape(-1).view(r.xp.uint8))
                ops.append(dist.P2POp(dist.irecv, tensor, self._global(r.source), self.group))
            works = dist.batch_isend_irecv(ops)

        def finish():
            with self._cupy_stream(on_gpu):
                for w in works:
                    w.wait()
            del buffers[:]
            return outs

        return finish

    @staticmethod
    def _cupy_stream(on_gpu):
        """Torch's current stream set to CuPy's, so both order the same work (CUDA only)."""
        import contextlib

        if not on_gpu:
            return contextlib.nullcontext()
        import cupy
        import torch

        pointer = cupy.cuda.get_current_stream().ptr
        if pointer == 0:  # CuPy's legacy default stream is torch's default stream too
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.ExternalStream(pointer))


class NcclCommunicator(Communicator):
    """A ``cupy.cuda.nccl`` communicator; transfers run on a side stream of their own.

    Each batch is one ``ncclGroupStart`` / ``ncclGroupEnd`` of sends and receives queued on
    :attr:`stream` after everything queued so far on CuPy's current stream; waiting makes the
    current stream wait for the batch (no host synchronisation), so compute queued in between
    overlaps the transfer.

    Parameters
    ----------
    comm : cupy.cuda.nccl.NcclCommunicator
        An existing communicator; or use :meth:`create`.
    """

    def __init__(self, comm):
        import cupy

        self._cupy = cupy
        self.comm = comm
        self.rank = comm.rank_id()
        self.size = comm.size()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.bytes_sent = 0
        self.messages_sent = 0
        self.device_only = True

    @classmethod
    def create(cls, size: int, rank: int, unique_id):
        """A new NCCL communicator (NVLink multicast switched off first).

        ``unique_id`` is ``cupy.cuda.nccl.get_unique_id()`` of rank 0, shared by the caller
        (through its launcher, a file, ``torch.distributed`` or MPI).
        """
        disable_nvlink_multicast()
        from cupy.cuda import nccl

        return cls(nccl.NcclCommunicator(size, unique_id, rank))

    def _start(self, sends, recvs):
        cupy = self._cupy
        from cupy.cuda import nccl

        # Byte views (a copy where a send is not contiguous) and receive buffers are made on
        # the current stream, before the event the transfer stream waits for.
        keep = [(_bytes_of(xp, x), dest) for xp, x, dest in sends]
        outs = [cupy.empty(r.shape, dtype=r.dtype) for r in recvs]
        current = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(current)
        self.stream.wait_event(ready)
        nccl.groupStart()
        try:
            for data, dest in keep:
                self.comm.send(data.data.ptr, data.size, nccl.NCCL_UINT8, dest, self.stream.ptr)
            for r, out in zip(recvs, outs):
                flat = out.reshape(-1).view(cupy.uint8)
                self.comm.recv(flat.data.ptr, flat.size, nccl.NCCL_UINT8, r.source,
                               self.stream.ptr)
        finally:
            nccl.groupEnd()
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)

        def finish():
            cupy.cuda.get_current_stream().wait_event(done)
            del keep[:]
            return outs

        return finish


class MpiCommunicator(Communicator):
    """An ``mpi4py`` communicator (``MPI.COMM_WORLD`` by default).

    Host arrays always; CuPy arrays only with a CUDA-aware MPI (the current stream is
    synchronised before the transfer, since MPI knows no streams).
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.bytes_sent = 0
        self.messages_sent = 0

    def _start(self, sends, recvs):
        if any(xp is not np for xp, _, _ in sends) or any(r.xp is not np for r in recvs):
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        requests, keep, outs = [], [], []
        for xp, x, dest in sends:
            data = _bytes_of(xp, x)
            keep.append(data)
            requests.append(self.comm.Isend(data, dest=dest, tag=0))
        for r in recvs:
            out = r.xp.empty(r.shape, dtype=r.dtype)
            outs.append(out)
            requests.append(self.comm.Irecv(out.reshape(-1).view(r.xp.uint8), source=r.source,
                                            tag=0))

        def finish():
            self._mpi.Request.Waitall(requests)
            del keep[:]
            return outs

        return finish


def _check_comm(comm):
    if not isinstance(comm, Communicator):
        raise TypeError("comm must be a pysparse_attn.distributed.Communicator (LocalWorld's "
                        "comms, TorchCommunicator, NcclCommunicator, MpiCommunicator), got "
                        f"{type(comm).__name__}")
    return comm


def _gather_ints(comm, values):
    """Every rank's tuple of ints, as an int64 array ``(size, len(values))``."""
    mine = np.asarray(values, dtype=np.int64)
    return np.stack(comm.allgather(mine))


# --------------------------------------------------------------------------------------------
# Ulysses
# --------------------------------------------------------------------------------------------

@dataclass
class UlyssesStats:
    """Statistics of :func:`ulysses_attention` on one rank.

    Attributes
    ----------
    lse, recall_bound : array ``(B, H, n_r)``
        Per row of this rank's sequence shard, all heads (as the single-device call's rows).
    local : AttentionStats
        The local call's statistics, for this rank's heads and the whole sequence; ``kept`` is
        what :func:`ulysses_attention_vjp` replays.
    heads : slice
        This rank's query heads.
    kv_heads : slice
        The key/value heads it received.
    """

    lse: Any
    recall_bound: Any
    local: Any
    heads: slice
    kv_heads: slice


def _head_split(Hq, Hkv, size):
    """Query-head and kv-head slices of every rank; ValueError when the heads do not split."""
    if Hq % size:
        raise ValueError(f"q has {Hq} heads, which {size} ranks cannot split evenly (Ulysses "
                         "shards heads; use ring_attention)")
    per = Hq // size
    group = Hq // Hkv
    if per % group and group % per:
        raise ValueError(f"k has {Hkv} heads for {Hq} query heads (groups of {group}): {size} "
                         f"ranks of {per} query heads would split a group unevenly")
    heads = [slice(r * per, (r + 1) * per) for r in range(size)]
    kv = [slice(h.start // group, (h.stop - 1) // group + 1) for h in heads]
    return heads, kv


def _slice_rule(skip, heads: slice, Hq):
    """A skip rule with its per-head parameters cut to ``heads``."""
    if skip is None or not dataclasses.is_dataclass(skip):
        return skip
    changes = {}
    for f in dataclasses.fields(skip):
        value = getattr(skip, f.name)
        if isinstance(value, np.ndarray) and value.ndim == 1:
            if value.shape[0] != Hq:
                raise ValueError(f"skip: {f.name} has {value.shape[0]} per-head values but the "
                                 f"query has {Hq} heads")
            changes[f.name] = value[heads]
    return dataclasses.replace(skip, **changes) if changes else skip


def _slice_mask(select, heads: slice, Hq):
    if not isinstance(select, BlockMask):
        return select
    mask = select.mask
    if getattr(mask, "ndim", 0) == 4 and mask.shape[1] == Hq and Hq > 1:
        return BlockMask(mask[:, heads])
    return select


def _to_heads(comm, x, heads, seq_axis_sizes):
    """Sequence shard ``(B, Hx, n_r, D)`` -> head shard ``(B, h_r, N, D)`` (all-to-all)."""
    xp = _namespace(x)
    B, _, _, D = x.shape
    chunks = [_contiguous(xp, x[:, heads[j]]) for j in range(comm.size)]
    mine = heads[comm.rank]
    width = mine.stop - mine.start
    recvs = [Recv((B, width, int(seq_axis_sizes[i]), D), x.dtype, i, xp)
             for i in range(comm.size)]
    parts = comm.alltoall(chunks, recvs)
    return xp.concatenate(parts, axis=2)


def _to_sequence(comm, y, heads, offsets, total_heads, accumulate=False):
    """Head shard ``(B, h_r, N, ...)`` -> sequence shard ``(B, H, n_r, ...)`` (all-to-all).

    With ``accumulate`` the head ranges may overlap (kv heads shared by several ranks under
    grouped-query attention) and overlapping parts are summed in the accumulation dtype.
    """
    xp = _namespace(y)
    rest = tuple(y.shape[3:])
    B = y.shape[0]
    chunks = [_contiguous(xp, y[:, :, int(offsets[j]):int(offsets[j + 1])])
              for j in range(comm.size)]
    n_mine = int(offsets[comm.rank + 1] - offsets[comm.rank])
    recvs = [Recv((B, heads[i].stop - heads[i].start, n_mine) + rest, y.dtype, i, xp)
             for i in range(comm.size)]
    parts = comm.alltoall(chunks, recvs)
    if not accumulate:
        return xp.concatenate(parts, axis=1)
    acc = _accumulator(xp, y.dtype)
    total = xp.zeros((B, total_heads, n_mine) + rest, dtype=acc)
    for i, p in enumerate(parts):
        total[:, heads[i]] += p
    return total.astype(y.dtype)


def _all_finite(*arrays) -> int:
    """1 when every array is finite (one float64 reduction each, elementwise only on doubt)."""
    for x in arrays:
        xp = _namespace(x)
        with np.errstate(over="ignore", invalid="ignore"):
            total = x.sum(dtype=xp.float64)
        if not bool(xp.isfinite(total)) and not bool(
                xp.isfinite(x.astype(_accumulator(xp, x.dtype))).all()):
            return 0
    return 1


def _raise_if_not_finite(flags):
    """Every rank raises together (a rank raising alone would leave the others waiting)."""
    if not flags.all():
        bad = np.flatnonzero(flags == 0).tolist()
        raise ValueError(f"q, k or v contains NaN or infinity on rank(s) {bad}")


def _bhnd_inputs(q, k, v, layout):
    """q, k, v as 4-D (B, H, N, D) arrays of this rank, and the function that gives a result
    back in the caller's namespace (both schemes start here)."""
    (q, give), (k, _), (v, _) = _view("q", q), _view("k", k), _view("v", v)
    q, k, v = (_as_bhnd(x, layout) for x in (q, k, v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(x.shape)}")
    return q, k, v, give


def _ulysses_setup(comm, q, k, v, layout, check_finite=True):
    comm = _check_comm(comm)
    q, k, v, give = _bhnd_inputs(q, k, v, layout)
    B, Hq, nq, D = q.shape
    info = _gather_ints(comm, (B, Hq, k.shape[1], D, nq, k.shape[2], v.shape[2],
                               _all_finite(q, k, v) if check_finite else 1))
    _raise_if_not_finite(info[:, 7])
    if (info[:, :4] != info[0, :4]).any():
        raise ValueError(f"q, k: every rank needs the same (B, Hq, Hkv, D); got {info[:, :4]}")
    if (info[:, 5] != info[:, 6]).any():
        raise ValueError("v must have the sequence length of k on every rank")
    heads, kv = _head_split(Hq, k.shape[1], comm.size)
    q_offsets = np.concatenate([[0], np.cumsum(info[:, 4])])
    k_offsets = np.concatenate([[0], np.cumsum(info[:, 5])])
    return comm, q, k, v, give, heads, kv, info, q_offsets, k_offsets


def _ulysses_kwargs(kwargs, heads, Hq):
    kwargs = dict(kwargs)
    kwargs["skip"] = _slice_rule(kwargs.get("skip"), heads, Hq)
    if "select" in kwargs:
        kwargs["select"] = _slice_mask(kwargs["select"], heads, Hq)
    return kwargs


def ulysses_attention(q, k, v, comm, *, sla=False, layout="bhnd", return_stats=False,
                      **options):
    """Sequence-parallel attention by head all-to-all (DeepSpeed-Ulysses).

    Each rank gives its sequence shard; the result is this rank's shard of exactly what
    :func:`pysparse_attn.attention` (or :func:`pysparse_attn.sla_attention` with ``sla=True``)
    returns on the whole sequence, including skip decisions and statistics.

    Parameters
    ----------
    q : array ``(B, Hq, n_r, D)``
        This rank's query rows (ranks in sequence order; shards may differ in length).
    k, v : array ``(B, Hkv, m_r, D)``
        This rank's key/value rows (cross-attention: ``m_r`` independent of ``n_r``).
    comm : Communicator
    sla : bool
        Run :func:`pysparse_attn.sla_attention` (``options`` then need ``critical`` and
        ``negligible``) instead of :func:`pysparse_attn.attention`.
    layout : {"bhnd", "bnhd"}
    return_stats : bool
        Also return a :class:`UlyssesStats`.
    **options
        Every other keyword of the local call (``select``, ``skip``, ``order``, ``block``,
        ``backend``, ``proj_weight``...). Per-head skip parameters ``(Hq,)`` and a per-head
        ``BlockMask`` ``(B, Hq, nq, nk)`` are cut to this rank's heads.

    Returns
    -------
    out : array ``(B, Hq, n_r, D)``
    stats : UlyssesStats
        Only with ``return_stats=True``.

    Raises
    ------
    ValueError
        When ``Hq`` is not a multiple of the world size, or a GQA group would be split unevenly.
    """
    comm, q, k, v, give, heads, kv, info, q_off, k_off = _ulysses_setup(comm, q, k, v, layout)
    Hq = q.shape[1]
    qh = _to_heads(comm, q, heads, info[:, 4])
    kh = _to_heads(comm, k, kv, info[:, 5])
    vh = _to_heads(comm, v, kv, info[:, 5])
    local = _ulysses_kwargs(options, heads[comm.rank], Hq)
    function = _api.sla_attention if sla else _api.attention
    out, stats = function(qh, kh, vh, return_stats=True, **local)
    out_seq = _to_sequence(comm, out, heads, q_off, Hq)
    result = give(_as_bhnd(out_seq, layout))
    if not return_stats:
        return result
    rows = _to_sequence(comm, stats.lse[..., None], heads, q_off, Hq)[..., 0]
    bound = _to_sequence(comm, stats.recall_bound[..., None], heads, q_off, Hq)[..., 0]
    return result, UlyssesStats(lse=give(rows), recall_bound=give(bound), local=stats,
                                heads=heads[comm.rank], kv_heads=kv[comm.rank])


def ulysses_attention_vjp(q, k, v, do, comm, *, sla=False, kept=None, layout="bhnd",
                          **options):
    """Gradients of :func:`ulysses_attention` with the forward's kept set replayed.

    Parameters
    ----------
    q, k, v, comm, sla, layout, **options
        As in :func:`ulysses_attention`.
    do : array ``(B, Hq, n_r, D)``
        This rank's rows of the output cotangent.
    kept : bool array, optional
        ``stats.local.kept`` of the forward on this rank (its heads, all query tiles); the
        forward is run again when None.

    Returns
    -------
    dq, dk, dv : arrays
        This rank's sequence shards. Under grouped-query attention a kv head shared by several
        ranks gets the sum of their contributions.
    dW, db : arrays
        With ``sla=True`` only: summed over ranks (every rank holds the same totals).
    """
    comm, q, k, v, give, heads, kv, info, q_off, k_off = _ulysses_setup(comm, q, k, v, layout)
    do, _ = _view("do", do)
    do = _as_bhnd(do, layout)
    if tuple(do.shape) != tuple(q.shape):
        raise ValueError(f"do must have the shape of q {tuple(q.shape)}, got {tuple(do.shape)}")
    Hq, Hkv = q.shape[1], k.shape[1]
    qh = _to_heads(comm, q, heads, info[:, 4])
    kh = _to_heads(comm, k, kv, info[:, 5])
    vh = _to_heads(comm, v, kv, info[:, 5])
    gh = _to_heads(comm, do, heads, info[:, 4])
    local = _ulysses_kwargs(options, heads[comm.rank], Hq)
    function = _api.sla_vjp if sla else _api.attention_vjp
    grads = function(qh, kh, vh, gh, kept=kept, **local)
    dq = _to_sequence(comm, grads[0], heads, q_off, Hq)
    dk = _to_sequence(comm, grads[1], kv, k_off, Hkv, accumulate=True)
    dv = _to_sequence(comm, grads[2], kv, k_off, Hkv, accumulate=True)
    result = tuple(give(_as_bhnd(g, layout)) for g in (dq, dk, dv))
    if not sla:
        return result
    d_weight, d_bias = (comm.allreduce_sum(g) for g in grads[3:])
    return result + (give(d_weight), give(d_bias))


# --------------------------------------------------------------------------------------------
# Ring
# --------------------------------------------------------------------------------------------

def merge_recall(lse, bound):
    """Merge per-shard LSE and ``recall_bound`` into the row's LSE and certified bound.

    Shard ``s`` of a row reports ``LSE_s`` over its kept keys and ``R_s = l_s / (l_s + u_s)``
    where, in the running-max frame ``m_s`` of that shard's loop, ``l_s`` is the kept sum and
    ``u_s`` the bound on the skipped mass. In the absolute frame the kept mass is
    ``L_s = l_s e^{m_s} = e^{LSE_s}`` and the skipped bound ``U_s = u_s e^{m_s} =
    e^{LSE_s} (1/R_s - 1)``. The merged row has ``L = sum_s L_s``, ``U = sum_s U_s`` and reports
    ``R = L / (L + U)``.

    **Claim.** If every shard certifies ``u_s <= c l_s`` with ``c = (1 - R*)/R*`` (the invariant
    the ``Recall(R*)`` rule keeps, docs/design.rst section 5), the merged row keeps at least ``R*`` of
    its visited mass.

    **Proof.** Multiplying by ``e^{m_s} > 0`` gives ``U_s <= c L_s`` for every shard; summing,
    ``U <= c L``, so ``L / (L + U) >= L / (L + c L) = 1 / (1 + c) = R*``. Each shard's true
    skipped mass ``T_s`` satisfies ``T_s <= U_s``, hence ``T = sum T_s <= U`` and the true kept
    share of the visited mass, ``L / (L + T)``, is at least the reported ``L / (L + U)``. When
    every key tile of every shard is visited (no selector, no dropped shard) the visited mass is
    the whole softmax row, so the bound is a certified lower bound on the row's recall. QED.

    Parameters
    ----------
    lse, bound : sequences of arrays ``(..., N)``
        One per shard; a shard with ``LSE = -inf`` (no key kept for that row) counts nothing.

    Returns
    -------
    lse, bound : arrays
        Merged LSE and ``L / (L + U)`` (1 where nothing was skipped).
    """
    xp = _namespace(lse[0])
    lse = [xp.asarray(x) for x in lse]
    log_kept = _logsumexp(xp, lse)
    log_skipped = _logsumexp(xp, [_log_skipped(xp, l, r) for l, r in zip(lse, bound)])
    return log_kept, _bound_from_logs(xp, log_kept, log_skipped)


def _log_skipped(xp, lse, bound):
    """``log U_s = LSE_s + log(1/R_s - 1)``; ``-inf`` when nothing was skipped."""
    bound = xp.asarray(bound, dtype=lse.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = xp.log1p(-bound) - xp.log(bound)
        out = lse + ratio
    return xp.where((bound >= 1) | xp.isneginf(lse), -xp.inf, out)


def _bound_from_logs(xp, log_kept, log_skipped):
    with np.errstate(over="ignore", invalid="ignore"):
        bound = 1.0 / (1.0 + xp.exp(log_skipped - log_kept))
    return xp.where(xp.isneginf(log_skipped), 1.0, bound).astype(log_kept.dtype)


def _logsumexp(xp, terms):
    top = terms[0]
    for t in terms[1:]:
        top = xp.maximum(top, t)
    safe = xp.where(xp.isneginf(top), 0.0, top)
    total = xp.zeros_like(top)
    for t in terms:
        total = total + xp.exp(t - safe)
    with np.errstate(divide="ignore"):
        return xp.where(xp.isneginf(top), -xp.inf, safe + xp.log(total))


@dataclass
class RingStats:
    """Statistics of :func:`ring_attention` on one rank (its query rows, all key tiles).

    Attributes
    ----------
    lse : array ``(B, H, n_r)``
        Merged log-sum-exp over the kept keys of every shard.
    recall_bound : array ``(B, H, n_r)``
        Merged certified bound ``L / (L + U)`` (:func:`merge_recall`): with no selector and no
        dropped shard, a lower bound on each row's full recall.
    kept, visited : bool arrays ``(B, H, nq_r, nk)``
        Key tiles of the *global* key sequence whose P.V was accumulated / whose QK^T ran.
    density, sparsity : float
        Over this rank's rows and all key tiles.
    bounded : bool
        True when ``recall_bound`` bounds the full-row recall (nothing dropped by a plan).
    dropped_shards : tuple of int
        Ranks whose K/V shard this rank neither fetched nor computed on.
    transfers : int
        K/V shards this rank received (a dropped shard is not transferred).
    wait_s, compute_s : float
        Host seconds spent waiting for transfers and in the local attention calls and merges.
        On the host (and for MPI) they are the exposed communication and the compute; on the GPU
        both only queue work (NCCL waits are stream waits), so time a step with a device
        synchronisation instead, as ``bench/distributed.py`` does.
    """

    lse: Any
    recall_bound: Any
    kept: Any
    visited: Any
    density: float
    sparsity: float
    bounded: bool
    dropped_shards: tuple
    transfers: int
    wait_s: float = 0.0
    compute_s: float = 0.0
    extra: dict = field(default_factory=dict, repr=False)


def _selected_tiles(xp, qbar, kbar, select, scale):
    """The selector's kept key tiles ``(B, H, nq_r, nk)`` for pooled query and key tiles.

    With one-row tiles the pooled tiles are their own tiles, so the plan builder applied to
    ``(qbar, kbar)`` with ``block=(1, 1)`` is the single-device plan of those query tiles against
    the whole key sequence (scores, centring over all key tiles, top-k/top-p, ties).
    """
    import pysparse_attn as psa

    public = getattr(psa, "plan", None)
    if public is not None:  # the public Plan builder (front end v2)
        return xp.asarray(public(qbar, kbar, select=select, block=(1, 1),
                                 scale=scale).visit_bitmap())
    from ._plan import build_plan  # until the builder is public

    plan = build_plan(xp, qbar, kbar, select, "natural", 0, (1, 1), scale)
    nk = kbar.shape[2]
    keep = xp.zeros(qbar.shape[:3] + (nk + 1,), dtype=bool)  # column nk absorbs the -1 pads
    index = xp.where(plan.visit >= 0, plan.visit, nk).astype(xp.int64)
    xp.put_along_axis(keep, index, True, axis=-1)
    return keep[..., :nk]


@dataclass
class _RingSetup:
    comm: Any
    xp: Any
    q: Any
    k: Any
    v: Any
    give: Any
    block: tuple
    scale: float
    q_tiles: np.ndarray      # (size + 1,) query-tile offsets of the ranks
    k_tiles: np.ndarray      # (size + 1,) key-tile offsets of the ranks
    k_rows: np.ndarray       # (size,) key rows of each rank
    keep: Any                # (B, H, nq_r, nk) bool or None (every tile)
    need: np.ndarray         # (size, size) bool: rank r fetches shard s
    plan_dropped: bool       # a selector or mask left some tile out


def _ring_setup(comm, q, k, v, select, scale, block, drop_mass, layout, check_finite):
    comm = _check_comm(comm)
    q, k, v, give = _bhnd_inputs(q, k, v, layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if min(x.shape) == 0:
            raise ValueError(f"{name} must be non-empty on every rank, got {tuple(x.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if type(q) is not type(k) or type(q) is not type(v):
        raise TypeError("q, k and v must come from the same array namespace")
    if not (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    block = tuple(block)
    xp = _namespace(q)
    B, Hq, nq_rows, D = q.shape
    info = _gather_ints(comm, (B, Hq, k.shape[1], D, nq_rows, k.shape[2],
                               _all_finite(q, k, v) if check_finite else 1))
    _raise_if_not_finite(info[:, 6])
    if (info[:, :4] != info[0, :4]).any():
        raise ValueError(f"q, k: every rank needs the same (B, Hq, Hkv, D); got {info[:, :4]}")
    for name, col, size in (("q", 4, block[0]), ("k", 5, block[1])):
        if (info[:-1, col] % size).any():
            raise ValueError(f"{name}: every rank but the last must hold a multiple of the "
                             f"tile size {size} rows (shards are whole tiles), got "
                             f"{info[:, col].tolist()}")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    q_tiles = np.concatenate([[0], np.cumsum([tile_count(n, block[0]) for n in info[:, 4]])])
    k_tiles = np.concatenate([[0], np.cumsum([tile_count(n, block[1]) for n in info[:, 5]])])
    nk = int(k_tiles[-1])
    nq_r = tile_count(nq_rows, block[0])
    size = comm.size

    keep = None
    plan_dropped = False
    need_row = np.ones(size, dtype=bool)
    if select is not None or drop_mass is not None:
        if drop_mass is not None and not (isinstance(drop_mass, (int, float))
                                          and 0.0 <= float(drop_mass) < 1.0):
            raise ValueError(f"drop_mass must be None or in [0, 1), got {drop_mass!r}")
        kbar_all, qbar = _exchange_pooled(comm, xp, q, k, block, k_tiles)
        if select is None:
            keep = xp.ones((B, Hq, nq_r, nk), dtype=bool)
        elif isinstance(select, BlockMask):
            keep = _ring_mask(xp, select.mask, (B, Hq, nq_r, nk))
        elif isinstance(select, (TopK, TopP)):
            keep = _selected_tiles(xp, qbar, kbar_all, select, scale)
        else:
            raise TypeError("select must be None, BlockMask, TopK or TopP, got "
                            f"{type(select).__name__}")
        plan_dropped = not bool(keep.all())
        if drop_mass is not None and drop_mass > 0:
            keep, mass_dropped = _drop_by_mass(xp, qbar, kbar_all, keep, k_tiles, scale,
                                               float(drop_mass))
            plan_dropped = plan_dropped or mass_dropped
        for s in range(size):
            need_row[s] = bool(keep[..., int(k_tiles[s]):int(k_tiles[s + 1])].any())
    need = np.stack(comm.allgather(need_row))
    return _RingSetup(comm, xp, q, k, v, give, block, float(scale), q_tiles, k_tiles,
                      info[:, 5].copy(), keep, need, plan_dropped)


def _exchange_pooled(comm, xp, q, k, block, k_tiles):
    """Pooled key tiles of every rank (the cheap first exchange) and this rank's pooled q."""
    kbar = pool_tiles(xp, k, block[1])
    widest = int(np.diff(k_tiles).max())
    padded = xp.zeros(kbar.shape[:2] + (widest, kbar.shape[3]), dtype=kbar.dtype)
    padded[:, :, :kbar.shape[2]] = kbar
    parts = comm.allgather(padded)
    counts = np.diff(k_tiles)
    kbar_all = xp.concatenate([p[:, :, :int(c)] for p, c in zip(parts, counts)], axis=2)
    return kbar_all, pool_tiles(xp, q, block[0])


def _ring_mask(xp, mask, shape):
    """A user mask of this rank's query tiles against all key tiles, broadcast to ``shape``."""
    if _is_cupy(mask) != (xp is not np):
        mask = xp.asarray(mask.get() if _is_cupy(mask) else mask)
    mask = xp.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"select: BlockMask.mask must be boolean, got dtype {mask.dtype}")
    try:
        mask = xp.broadcast_to(mask, shape)
    except ValueError as error:
        raise ValueError(f"select: the ring's BlockMask holds this rank's query tiles against "
                         f"every key tile, broadcastable to {shape}; got "
                         f"{tuple(mask.shape)}") from error
    if not bool(mask.any(axis=-1).all()):
        raise ValueError("select: every query tile needs at least one true tile in its mask")
    return mask


def _drop_by_mass(xp, qbar, kbar_all, keep, k_tiles, scale, drop_mass):
    """Drop the shards whose estimated mass is below ``drop_mass`` for every row of this rank.

    The estimate is the block-score softmax ``Ŝ`` (docs/design.rst section 3) summed over a shard's
    kept tiles. A shard holding some row's best kept tile is never dropped, so every row keeps
    a tile.
    """
    scores = _api.block_scores(qbar, kbar_all, block=(1, 1), scale=scale)
    scores = xp.where(keep, xp.asarray(scores), -xp.inf)
    top = scores.max(axis=-1, keepdims=True)
    mass = xp.exp(scores - top)
    mass = mass / mass.sum(axis=-1, keepdims=True)
    best = scores.argmax(axis=-1)
    dropped = False
    keep = keep.copy()
    for s in range(len(k_tiles) - 1):
        lo, hi = int(k_tiles[s]), int(k_tiles[s + 1])
        shard_mass = float(mass[..., lo:hi].sum(axis=-1).max())
        holds_best = bool(((best >= lo) & (best < hi)).any())
        if shard_mass < drop_mass and not holds_best and bool(keep[..., lo:hi].any()):
            keep[..., lo:hi] = False
            dropped = True
    return keep, dropped


def _shard_call(setup, q, k_s, v_s, s, skip, order, peak, backend, threads, *, keep=None,
                values=None):
    """One local attention of this rank's rows against shard ``s``.

    Returns ``(out, lse, bound, kept, visited)`` for all of this rank's rows; only the query
    tiles that keep a tile of the shard are computed, the others get O = 0, LSE = -inf and
    bound 1; kept/visited are this shard's columns.
    Query-tile rows of a (batch, head) with no kept tile in the shard visit one tile (the
    mask needs one per row) whose result is discarded here.
    """
    xp = setup.xp
    Bq, Bk = setup.block
    B, H, n_rows, D = q.shape
    nq_r = tile_count(n_rows, Bq)
    lo, hi = int(setup.k_tiles[s]), int(setup.k_tiles[s + 1])
    local_keep = None if keep is None else keep[..., lo:hi]
    rows = None
    q_sub = q
    select = None
    empty = None
    if local_keep is not None and not bool(local_keep.all()):
        any_row = local_keep.any(axis=(0, 1, 3))
        any_row = any_row.get() if _is_cupy(any_row) else np.asarray(any_row)
        rows = np.flatnonzero(any_row)
        if rows.size < nq_r:
            tokens = np.concatenate([np.arange(r * Bq, min((r + 1) * Bq, n_rows))
                                     for r in rows])
            q_sub = q[:, :, xp.asarray(tokens)]
            local_keep = local_keep[:, :, xp.asarray(rows)]
        else:
            rows = None
        empty = ~local_keep.any(axis=-1)
        mask = local_keep.copy()
        mask[..., 0] |= empty
        select = BlockMask(mask)
    v_in = v_s if values is None else values
    out, stats = _api.attention(q_sub, k_s, v_in, select=select, skip=skip, order=order,
                                peak=peak, scale=setup.scale, block=setup.block,
                                backend=backend, return_stats=True, threads=threads,
                                check_finite=False)
    lse, bound = stats.lse, stats.recall_bound
    kept, visited = stats.kept, stats.visited
    if empty is not None and bool(empty.any()):
        row_empty = xp.repeat(empty, Bq, axis=2)[:, :, :q_sub.shape[2]]
        lse = xp.where(row_empty, -xp.inf, lse)
        bound = xp.where(row_empty, 1.0, bound).astype(stats.recall_bound.dtype)
        out = xp.where(row_empty[..., None], 0, out).astype(out.dtype)
        kept = kept & ~empty[..., None]
        visited = visited & ~empty[..., None]
    if rows is not None:
        full_out = xp.zeros((B, H, n_rows, D), dtype=out.dtype)
        full_lse = xp.full((B, H, n_rows), -xp.inf, dtype=lse.dtype)
        full_bound = xp.ones((B, H, n_rows), dtype=bound.dtype)
        full_kept = xp.zeros((B, H, nq_r, hi - lo), dtype=bool)
        full_visited = xp.zeros((B, H, nq_r, hi - lo), dtype=bool)
        index = xp.asarray(tokens)
        full_out[:, :, index] = out
        full_lse[:, :, index] = lse
        full_bound[:, :, index] = bound
        full_kept[:, :, xp.asarray(rows)] = kept
        full_visited[:, :, xp.asarray(rows)] = visited
        out, lse, bound, kept, visited = full_out, full_lse, full_bound, full_kept, full_visited
    return out, lse, bound, kept, visited


def _shift_schedule(rank, size, step):
    """Shard visited at ``step`` and the rank this rank's shard goes to at that step.

    Step ``t`` fetches shard ``(r - t) mod W`` straight from its owner (a shifted ring): on a
    fully connected node (NVSwitch) this moves what a neighbour relay moves, and unlike a relay
    it lets a transfer nobody needs be skipped (a relay must forward what its successor needs).
    """
    return (rank - step) % size, (rank + step) % size


def _post_shard(setup, step, arrays):
    """Start the K/V transfer of ``step``: send my shard where it is needed, receive mine."""
    comm, xp = setup.comm, setup.xp
    rank, size = comm.rank, comm.size
    source, dest = _shift_schedule(rank, size, step)
    sends = []
    recvs = []
    if dest != rank and setup.need[dest, rank]:
        sends = [(x, dest) for x in arrays]
    if source != rank and setup.need[rank, source]:
        rows = int(setup.k_rows[source])
        recvs = [Recv((x.shape[0], x.shape[1], rows, x.shape[3]), x.dtype, source, xp)
                 for x in arrays]
    return comm.start(sends, recvs), bool(recvs)


def ring_attention(q, k, v, comm, *, select=None, skip=None, order=None, peak=4, scale=None,
                   block=(64, 64), drop_mass=None, layout="bhnd", backend="auto",
                   return_stats=False, threads=None, check_finite=True):
    """Sequence-parallel attention by passing K/V shards around the ranks (ring attention).

    Rank ``r`` keeps its query rows and, at step ``t = 0 .. W-1``, attends to the K/V shard of
    rank ``(r - t) mod W`` with one local :func:`pysparse_attn.attention` call (``select``'s
    tiles of that shard, ``skip`` inside), merging the partial outputs by LSE and the
    certified-recall bookkeeping by :func:`merge_recall`. The transfer of step ``t + 1`` is
    posted before step ``t`` is computed.

    Shards are whole tiles: every rank but the last holds a multiple of ``Bq`` query rows and
    ``Bk`` key rows, so the ranks' tiles are the single-device tiles. SLA runs under
    :func:`ulysses_attention` only: its linear branch divides by sums over every marginal tile
    of the row, which the public API does not return per shard.

    Parameters
    ----------
    q : array ``(B, Hq, n_r, D)``
        This rank's query rows (ranks in sequence order).
    k, v : array ``(B, Hkv, m_r, D)``
        This rank's key/value rows (cross-attention: any ``m_r``).
    comm : Communicator
    select : None, BlockMask, TopK or TopP
        The plan over the *global* key tiles. ``BlockMask.mask`` holds this rank's query tiles
        against every key tile (``(B, Hq, nq_r, nk)`` or broadcastable). ``TopK``/``TopP`` are
        decided on block scores of this rank's pooled query tiles against every rank's pooled
        key tiles (exchanged first, ``nk * D`` values a head), which is the single-device plan.
    skip : None, Blasst, Cef or Recall
        Applied inside each shard's loop with that shard's running statistics, started afresh
        per shard (as one device visiting the shards one by one with a new state each):
        ``Blasst`` and ``Cef`` see a shard's running max, never more than the row's; ``Recall``
        keeps its guarantee for the merged row (:func:`merge_recall`).
    order, peak, scale, block, backend, threads, check_finite
        As in :func:`pysparse_attn.attention` (``order`` acts within each shard).
    drop_mass : float, optional
        Drop a whole remote shard, its transfer included, when its estimated mass (block-score
        softmax, summed over the shard's kept tiles) is below this for every row of this rank;
        the shard holding a row's best tile is always kept. Dropped tiles are outside the
        ``Recall`` guarantee (``stats.bounded`` is then False). ``None``: no mass estimate.
    layout : {"bhnd", "bnhd"}
    return_stats : bool
        Also return a :class:`RingStats`.

    Returns
    -------
    out : array ``(B, Hq, n_r, D)``
    stats : RingStats
        Only with ``return_stats=True``.
    """
    setup = _ring_setup(comm, q, k, v, select, scale, block, drop_mass, layout, check_finite)
    out, stats = _ring_forward(setup, skip, order, peak, backend, threads)
    result = setup.give(_as_bhnd(out, layout))
    if not return_stats:
        return result
    stats.lse = setup.give(_as_bhnd_rows(stats.lse, layout))
    stats.recall_bound = setup.give(_as_bhnd_rows(stats.recall_bound, layout))
    return result, stats


def _as_bhnd_rows(x, layout):
    return x if layout == "bhnd" else x.swapaxes(1, 2)


def _ring_forward(setup, skip, order, peak, backend, threads):
    comm, xp = setup.comm, setup.xp
    q, k, v = setup.q, setup.k, setup.v
    rank, size = comm.rank, comm.size
    B, H, n_rows, D = q.shape
    acc = _accumulator(xp, q.dtype)
    nk = int(setup.k_tiles[-1])
    nq_r = tile_count(n_rows, setup.block[0])
    out_acc = xp.zeros((B, H, n_rows, D), dtype=acc)
    lse_run = xp.full((B, H, n_rows), -xp.inf, dtype=acc)
    log_skip = xp.full((B, H, n_rows), -xp.inf, dtype=acc)
    kept_all = xp.zeros((B, H, nq_r, nk), dtype=bool)
    visited_all = xp.zeros((B, H, nq_r, nk), dtype=bool)
    wait_s = compute_s = 0.0
    transfers = 0
    current = (k, v)
    pending = None
    for step in range(size):
        source, _ = _shift_schedule(rank, size, step)
        if step > 0:
            request, expects = pending
            arrived = request.wait()
            wait_s += request.waited_s
            current = tuple(arrived) if expects else None
            transfers += int(expects)
        if step + 1 < size:
            pending = _post_shard(setup, step + 1, (k, v))
        if not setup.need[rank, source]:
            continue
        k_s, v_s = current
        start = time.perf_counter()
        o_s, lse_s, bound_s, kept_s, visited_s = _shard_call(
            setup, q, k_s, v_s, source, skip, order, peak, backend, threads, keep=setup.keep)
        lse_s = lse_s.astype(acc)
        new_lse = _logsumexp(xp, [lse_run, lse_s])
        safe = xp.where(xp.isneginf(new_lse), 0.0, new_lse)
        out_acc = (out_acc * xp.exp(lse_run - safe)[..., None]
                   + o_s.astype(acc) * xp.exp(lse_s - safe)[..., None])
        lse_run = new_lse
        log_skip = _logsumexp(xp, [log_skip, _log_skipped(xp, lse_s, bound_s)])
        lo, hi = int(setup.k_tiles[source]), int(setup.k_tiles[source + 1])
        kept_all[..., lo:hi] = kept_s
        visited_all[..., lo:hi] = visited_s
        compute_s += time.perf_counter() - start
    bound = _bound_from_logs(xp, lse_run, log_skip)
    density = float(kept_all.mean())
    dropped = tuple(int(s) for s in np.flatnonzero(~setup.need[rank]))
    stats = RingStats(lse=lse_run, recall_bound=bound, kept=kept_all, visited=visited_all,
                      density=density, sparsity=1.0 - density,
                      bounded=not setup.plan_dropped and not dropped, dropped_shards=dropped,
                      transfers=transfers, wait_s=wait_s, compute_s=compute_s)
    return out_acc.astype(q.dtype), stats


def ring_attention_vjp(q, k, v, do, comm, *, out=None, stats=None, select=None, skip=None,
                       order=None, peak=4, scale=None, block=(64, 64), drop_mass=None,
                       layout="bhnd", backend="auto", threads=None):
    """Gradients of :func:`ring_attention` with every shard's kept set replayed.

    The K/V shards travel the forward's shifted ring again (dropped shards stay dropped) and
    each rank's dK/dV contributions to shard ``s`` go straight back to its owner, overlapped
    with the next step. Per shard the gradient is *recomputed* through the public API with the
    kept tiles replayed: the merged output is ``o = sum_s w_s O_s`` with
    ``w_s = exp(LSE_s - LSE)``, so

    ``d o = w_s dO_s + w_s (O_s - o) dLSE_s``;

    the first term is :func:`pysparse_attn.attention_vjp` of the shard with cotangent
    ``w_s do``; the second is the LSE's gradient with row weights
    ``g = w_s do . (O_s - o)``: ``dq_i += scale g_i sum_j P_ij k_j`` (a forward with values k)
    and ``dk_j += sum_i P_ij (scale g_i q_i)`` (the dv of a vjp with values k). Four local calls
    a shard (two forwards, two vjps): exact and built only on the public API, at about twice
    the cost of a fused ring backward that would take the global LSE in the kernel.

    Parameters
    ----------
    q, k, v, comm, select, skip, order, peak, scale, block, drop_mass, layout, backend, threads
        As in :func:`ring_attention` (ignored but ``scale``/``block`` when ``stats`` is given).
    do : array ``(B, Hq, n_r, D)``
        This rank's rows of the output cotangent.
    out, stats : optional
        The forward's output and :class:`RingStats`; the forward is run here when None.

    Returns
    -------
    dq, dk, dv : arrays
        This rank's shards, in the inputs' dtype.
    """
    if (out is None) != (stats is None):
        raise ValueError("out and stats: give both (the forward's results) or neither")
    if out is None:
        out, stats = ring_attention(q, k, v, comm, select=select, skip=skip, order=order,
                                    peak=peak, scale=scale, block=block, drop_mass=drop_mass,
                                    layout=layout, backend=backend, return_stats=True,
                                    threads=threads)
    if not isinstance(stats, RingStats):
        raise TypeError(f"stats must be the RingStats of the forward, got {type(stats).__name__}")
    setup = _ring_setup(comm, q, k, v, None, scale, block, None, layout, False)
    xp = setup.xp
    rank, size = setup.comm.rank, setup.comm.size
    # Replay: the forward's kept tiles are the plan; its dropped shards stay dropped.
    setup.keep = xp.asarray(stats.kept)
    setup.need = np.stack(setup.comm.allgather(np.array(
        [bool(setup.keep[..., int(setup.k_tiles[s]):int(setup.k_tiles[s + 1])].any())
         for s in range(size)])))
    (do, _), (o, _) = _view("do", do), _view("out", out)
    do, o = _as_bhnd(do, layout), _as_bhnd(o, layout)
    lse = _as_bhnd_rows(_view("stats.lse", stats.lse)[0], layout)
    q, k, v = setup.q, setup.k, setup.v
    if tuple(do.shape) != tuple(q.shape) or tuple(o.shape) != tuple(q.shape):
        raise ValueError(f"do and out must have the shape of q {tuple(q.shape)}")
    acc = _accumulator(xp, q.dtype)
    do_acc, o_acc, lse = do.astype(acc), o.astype(acc), xp.asarray(lse).astype(acc)
    safe_lse = xp.where(xp.isneginf(lse), 0.0, lse)
    dq = xp.zeros(q.shape, dtype=acc)
    dk_own = xp.zeros(k.shape, dtype=acc)
    dv_own = xp.zeros(v.shape, dtype=acc)
    current = (k, v)
    pending = None
    returning = []
    for step in range(size):
        source, dest = _shift_schedule(rank, size, step)
        if step > 0:
            request, expects = pending
            arrived = request.wait()
            current = tuple(arrived) if expects else None
        if step + 1 < size:
            pending = _post_shard(setup, step + 1, (k, v))
        grads = None
        if setup.need[rank, source]:
            grads = _shard_grads(setup, q, current[0], current[1], source, do_acc, o_acc,
                                 safe_lse, backend, threads)
            dq += grads[0]
        # dK/dV of shard `source` go to its owner; mine arrive from the rank I served.
        sends, recvs = [], []
        if grads is not None:
            if source == rank:
                dk_own += grads[1]
                dv_own += grads[2]
            else:
                sends = [(grads[1], source), (grads[2], source)]
        if dest != rank and setup.need[dest, rank]:
            recvs = [Recv(tuple(k.shape), acc, dest, xp), Recv(tuple(v.shape), acc, dest, xp)]
        if sends or recvs:
            returning.append((setup.comm.start(sends, recvs), bool(recvs)))
    for request, expects in returning:
        arrived = request.wait()
        if expects:
            dk_own += arrived[0]
            dv_own += arrived[1]
    return tuple(setup.give(_as_bhnd(g.astype(q.dtype), layout)) for g in (dq, dk_own, dv_own))


def _shard_grads(setup, q, k_s, v_s, s, do, o, lse, backend, threads):
    """(dq, dk_s, dv_s) of the merged output through shard ``s`` (see ring_attention_vjp)."""
    xp = setup.xp
    acc = do.dtype
    lo, hi = int(setup.k_tiles[s]), int(setup.k_tiles[s + 1])
    keep = setup.keep
    local = keep[..., lo:hi]
    o_s, lse_s, _, _, _ = _shard_call(setup, q, k_s, v_s, s, None, "natural", 0, backend,
                                      threads, keep=keep)
    weight = xp.where(xp.isneginf(lse_s.astype(acc)), 0.0,
                      xp.exp(lse_s.astype(acc) - lse))
    row_weight = (weight * (do * (o_s.astype(acc) - o)).sum(axis=-1))
    # Rows of query tiles with no kept tile here contribute nothing (weight 0); a kept mask
    # needs a tile in every row, so those rows visit tile 0 with a zero cotangent.
    empty = ~local.any(axis=-1)
    mask = local.copy()
    mask[..., 0] |= empty
    kept = mask
    dq1, dk1, dv1 = _api.attention_vjp(q, k_s, v_s, (weight[..., None] * do).astype(q.dtype),
                                       scale=setup.scale, block=setup.block, backend=backend,
                                       kept=kept, threads=threads)
    values_k = _api.attention(q, k_s, k_s, select=BlockMask(kept), scale=setup.scale,
                              block=setup.block, backend=backend, threads=threads,
                              check_finite=False)
    cotangent = (setup.scale * row_weight[..., None] * q.astype(acc)).astype(q.dtype)
    _, _, dk2 = _api.attention_vjp(q, k_s, k_s, cotangent, scale=setup.scale,
                                   block=setup.block, backend=backend, kept=kept,
                                   threads=threads)
    dq = dq1.astype(acc) + setup.scale * row_weight[..., None] * values_k.astype(acc)
    return dq, dk1.astype(acc) + dk2.astype(acc), dv1.astype(acc)
