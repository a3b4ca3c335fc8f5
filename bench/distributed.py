"""Sequence-parallel scaling: Ulysses and ring attention at Wan2.2-A14B 720p (N = 75,600).

Runs
----
* one GPU, world size 1 (the schemes' own overhead against a plain call)::

      python bench/distributed.py

* one GPU, ``W`` ranks as threads of one process (correctness of the sharded path at full size;
  the timings are not a scaling figure, the ranks share one GPU)::

      python bench/distributed.py --simulate 4

* ``W`` GPUs of one host, one process each, NCCL through torch.distributed (``--comm torch``)
  or through ``cupy.cuda.nccl`` (``--comm nccl``, the unique id shared over torch's store)::

      torchrun --nproc-per-node 4 bench/distributed.py

NVLink multicast stays off in every process: the switches of
``pysparse_attn.distributed.NVLINK_MULTICAST_OFF`` are set at the top of this file, before torch,
CuPy or NCCL is imported (torchrun's children run this file, so they set them too).

What is measured (CUDA-synchronised wall time, median of ``--repeats`` after one warm-up, the
slowest rank's): ``step`` is one whole forward call of the scheme; ``compute`` the same rank's
local attention calls alone on data already in place (``W`` calls on its own shard for the ring,
the head-shard call for Ulysses); ``comm`` the transfers alone (the ring's ``W - 1`` shifted K/V
exchanges; Ulysses's four all-to-alls). ``exposed`` = ``(step - compute) / step``, the share of a
step not hidden behind compute; ``efficiency`` = ``T_1 / (W * step)`` with ``T_1`` the plain
single-GPU call on the whole sequence, measured in the same process. ``err`` is the relative L2
error of the rank's rows against that single-GPU call.

Prints a table; writes one JSON record per row to ``--out`` (default ``$OUT`` or
``bench/results/``) as ``distributed-<date>-w<W>.jsonl``.
"""

from __future__ import annotations

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1"})

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pysparse_attn as psa  # noqa: E402
from pysparse_attn import distributed as dist  # noqa: E402

assert all(os.environ[name] == value for name, value in dist.NVLINK_MULTICAST_OFF.items())


def _rule(text):
    if text == "none":
        return None
    name, _, value = text.partition(":")
    makers = {"recall": psa.Recall, "blasst": psa.Blasst}
    if name not in makers:
        raise SystemExit(f"--skip: none, recall:R or blasst:LAM, got {text!r}")
    return makers[name](float(value))


def _selector(text):
    if text == "none":
        return None
    name, _, value = text.partition(":")
    if name == "topk":
        return psa.TopK(ratio=float(value))
    if name == "topp":
        return psa.TopP(float(value))
    raise SystemExit(f"--select: none, topk:RATIO or topp:P, got {text!r}")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=75600)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--grid", default="21,45,80", help="frames,height,width of the token grid")
    p.add_argument("--strength", type=float, default=2.0, help="locality of the workload")
    p.add_argument("--schemes", default="ulysses,ring")
    p.add_argument("--configs", default="dense;recall:0.95;topk:0.1",
                   help="';'-separated: dense, recall:R, blasst:LAM, topk:RATIO, topp:P")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--simulate", type=int, default=0, help="ranks as threads on one GPU")
    p.add_argument("--comm", choices=("torch", "nccl"), default="torch")
    p.add_argument("--drop-mass", type=float, default=None)
    p.add_argument("--host", action="store_true",
                   help="NumPy arrays and the CPU backend (a smoke test of this script)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    return p.parse_args()


def _config(text):
    if text == "dense":
        return {}
    if text.split(":")[0] in ("topk", "topp"):
        return {"select": _selector(text)}
    return {"skip": _rule(text)}


def _bounds(n, world, tile=64):
    tiles = -(-n // tile)
    cuts = [round(r * tiles / world) * tile for r in range(world)] + [n]
    return cuts


def _sync(xp):
    if xp is not np:
        xp.cuda.runtime.deviceSynchronize()


def _timed(xp, comm, fn, repeats):
    """Median seconds of ``fn()`` over ranks started together; the slowest rank's median."""
    fn()
    _sync(xp)
    times = []
    for _ in range(repeats):
        comm.allgather(np.zeros(1))  # line the ranks up
        start = time.perf_counter()
        fn()
        _sync(xp)
        times.append(time.perf_counter() - start)
    mine = statistics.median(times)
    return float(max(x[0] for x in comm.allgather(np.array([mine]))))


def _rel_l2(xp, a, b):
    a, b = a.astype(xp.float32), b.astype(xp.float32)
    return float(xp.linalg.norm(a - b) / xp.linalg.norm(b))


def _ring_comm_only(comm, k, v, bounds):
    """The ring's W - 1 shifted K/V exchanges with nothing computed."""
    rank, size = comm.rank, comm.size
    for step in range(1, size):
        source, dest = (rank - step) % size, (rank + step) % size
        rows = bounds[source + 1] - bounds[source]
        recvs = [dist.Recv((x.shape[0], x.shape[1], rows, x.shape[3]), x.dtype, source,
                           dist._namespace(x)) for x in (k, v)]
        comm.start([(k, dest), (v, dest)], recvs).wait()


def rank_main(comm, args, simulated, records):
    if args.host:
        xp = np
    else:
        import cupy as xp

    from gpu import video_like  # bench/gpu.py: the video-like workload of the GPU benchmarks

    W, rank = comm.size, comm.rank
    N, H, D = args.n, args.heads, args.dim
    grid = tuple(int(x) for x in args.grid.split(","))
    q, k, v = video_like(xp, 1, H, N, D, args.strength, seed=0, frames_hw=grid)
    bounds = _bounds(N, W)
    rows = slice(bounds[rank], bounds[rank + 1])
    q_r, k_r, v_r = (xp.ascontiguousarray(x[:, :, rows]) for x in (q, k, v))
    per = H // W if H % W == 0 else None
    for text in args.configs.split(";"):
        options = _config(text)
        plain = lambda: psa.attention(q, k, v, **options)  # noqa: E731
        t_one = _timed(xp, comm, plain, args.repeats)
        reference = plain()[:, :, rows]
        for scheme in args.schemes.split(","):
            if scheme == "ulysses" and per is None:
                continue
            if scheme == "ring":
                def step():
                    return dist.ring_attention(q_r, k_r, v_r, comm, drop_mass=args.drop_mass,
                                               return_stats=True, **options)

                def compute():
                    for _ in range(W):
                        psa.attention(q_r, k_r, v_r, **options)

                def communicate():
                    _ring_comm_only(comm, k_r, v_r, bounds)
            else:
                heads = slice(rank * per, (rank + 1) * per)

                def step():
                    return dist.ulysses_attention(q_r, k_r, v_r, comm, return_stats=True,
                                                  **options)

                def compute():
                    psa.attention(q[:, heads], k[:, heads], v[:, heads],
                                  **dist._ulysses_kwargs(options, heads, H))

                split = [slice(r * per, (r + 1) * per) for r in range(W)]
                sizes = np.diff(bounds)

                def communicate():
                    for x in (q_r, k_r, v_r):
                        dist._to_heads(comm, x, split, sizes)
                    dist._to_sequence(comm, q[:, split[rank]], split, np.asarray(bounds), H)
            t_step = _timed(xp, comm, step, args.repeats)
            t_compute = _timed(xp, comm, compute, args.repeats)
            t_comm = _timed(xp, comm, communicate, args.repeats) if W > 1 else 0.0
            out, stats = step()
            err = _rel_l2(xp, out, reference)
            worst = float(max(x[0] for x in comm.allgather(np.array([err]))))
            record = {
                "scheme": scheme, "config": text, "world": W, "simulated": simulated,
                "N": N, "H": H, "D": D, "step_ms": 1e3 * t_step, "compute_ms": 1e3 * t_compute,
                "comm_ms": 1e3 * t_comm, "one_gpu_ms": 1e3 * t_one,
                "exposed_share": max(0.0, (t_step - t_compute) / t_step),
                "efficiency": t_one / (W * t_step),
                "rel_l2_vs_one_gpu": worst,
                "sparsity": float(getattr(stats, "sparsity", getattr(
                    getattr(stats, "local", None), "sparsity", 0.0))),
                "dropped_shards": list(getattr(stats, "dropped_shards", ())),
            }
            if rank == 0:
                records.append(record)


def _environment(args):
    """``(runner, simulated)``: a function running ``rank_main`` on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import cupy
        import torch
        import torch.distributed as tdist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        cupy.cuda.Device(local).use()
        tdist.init_process_group("nccl")
        if args.comm == "torch":
            comm = dist.TorchCommunicator()
        else:
            from cupy.cuda import nccl

            uid = [nccl.get_unique_id() if tdist.get_rank() == 0 else None]
            tdist.broadcast_object_list(uid, src=0)
            comm = dist.NcclCommunicator.create(tdist.get_world_size(), tdist.get_rank(),
                                                uid[0])
        return (lambda body: body(comm)), False
    size = max(1, args.simulate)
    local_world = dist.LocalWorld(size, timeout=1800)
    return (lambda body: local_world.run(body)), size > 1


def _table(records):
    head = ("scheme", "config", "W", "step ms", "compute ms", "comm ms", "exposed", "1-GPU ms",
            "efficiency", "rel L2", "sparsity")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lines.append("| " + " | ".join([
            r["scheme"], r["config"], f"{r['world']}{' (sim)' if r['simulated'] else ''}",
            f"{r['step_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['comm_ms']:.1f}",
            f"{100 * r['exposed_share']:.0f}%", f"{r['one_gpu_ms']:.1f}",
            f"{100 * r['efficiency']:.0f}%", f"{r['rel_l2_vs_one_gpu']:.2e}",
            f"{100 * r['sparsity']:.0f}%"]) + " |")
    return "\n".join(lines)


def main():
    args = _parse()
    run, simulated = _environment(args)
    records = []
    run(lambda comm: rank_main(comm, args, simulated, records))
    if not records:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"distributed-{stamp}-w{records[0]['world']}.jsonl"
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(_table(records))
    print(f"\nwritten: {path}")
    if simulated:
        print("simulated: the ranks shared one GPU; timings are no scaling figure")


if __name__ == "__main__":
    main()
