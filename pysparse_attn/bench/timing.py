"""Timing of the benchmarks: interleaved rounds, CUDA events on the GPU, wall clock on the host.

One definition for every bench command. Functions are timed in *rounds*: each round calls
every function once in turn (``calls`` times back to back), so a drift of machine load between
rounds hits all of them alike and their ratios stay meaningful; medians over rounds are
reported.

On the GPU (``backend="cupy"``) a call is bracketed by CUDA events recorded on the current
stream and the calls of a round are *queued*: the host never waits between them, only once at
the end of the round, as a sampler loop runs. An event pair then measures the device time of
the call including any time the device sat idle waiting for the host to launch the call's
kernels, which is the cost of a call in a loop that has run ahead; a call that synchronises
with the host stalls the queue and shows as such. The host's own time to issue each call
(wall clock, no wait) is reported beside it: in a loop the host must keep ahead of the device,
so a call costs about the larger of the two. Put a long call first in ``functions``: it absorbs the start of
each round, when the queue is empty. On host backends each call is timed with
``time.perf_counter`` (the two figures are then the same).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["time_rounds", "synchronizer"]


def synchronizer(backend: str):
    """A function that waits for the device's queued work (a no-op on host backends)."""
    if backend != "cupy":
        return lambda: None
    import cupy

    return lambda: cupy.cuda.get_current_stream().synchronize()


def time_rounds(functions, rounds: int, backend: str, calls: int = 1, warmup: bool = True):
    """Median seconds per call of each of ``functions``, each one's last result, host times.

    Parameters
    ----------
    functions : sequence of callables
        Called without arguments. A function may also be a sequence of callables, one per
        call (e.g. calls that each consume a prepared state); it then needs ``rounds * calls``
        of them, plus one more when ``warmup``.
    rounds : int
        Timed rounds, >= 1.
    backend : str
        ``"cupy"`` for CUDA events on the current stream, else host wall clock.
    calls : int
        Back-to-back calls per function per round (their mean is the round's figure).
    warmup : bool
        One untimed call of each function first (compilation, caches, allocator pools).

    Returns
    -------
    seconds : list of float
        Median over rounds of the time per call, one per function.
    results : list
        The result of each function's last call.
    host_seconds : list of float
        Median over rounds of the host's wall time to issue one call (equal to ``seconds`` on
        host backends).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be a positive int, got {calls!r}")
    sources = [_source(f, rounds * calls + int(warmup)) for f in functions]
    results = [None] * len(sources)
    synchronize = synchronizer(backend)
    if warmup:
        for index, source in enumerate(sources):
            results[index] = source()
        synchronize()
    on_gpu = backend == "cupy"
    if on_gpu:
        import cupy
    samples = [[] for _ in sources]
    host_samples = [[] for _ in sources]
    for _ in range(rounds):
        marks = []
        for index, source in enumerate(sources):
            if on_gpu:
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                begin = time.perf_counter()
                for _ in range(calls):
                    results[index] = source()
                host_samples[index].append((time.perf_counter() - begin) / calls)
                end.record()
                marks.append((start, end))
            else:
                begin = time.perf_counter()
                for _ in range(calls):
                    results[index] = source()
                samples[index].append((time.perf_counter() - begin) / calls)
                host_samples[index].append(samples[index][-1])
        if on_gpu:
            marks[-1][1].synchronize()  # the one host wait of the round
            for index, (start, end) in enumerate(marks):
                samples[index].append(cupy.cuda.get_elapsed_time(start, end) * 1e-3 / calls)
    return ([float(np.median(s)) for s in samples], results,
            [float(np.median(s)) for s in host_samples])


def _source(function, needed):
    """A callable giving the next call of ``function`` (one callable, or one per call)."""
    if callable(function):
        return function
    calls = list(function)
    if len(calls) < needed:
        raise ValueError(f"a sequence of calls to time needs {needed} of them, got {len(calls)}")
    iterator = iter(calls)
    return lambda: next(iterator)()
