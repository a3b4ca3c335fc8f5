"""Where the wgmma backward's time goes: leave-one-out variants of its dK/dV pass, and its
schedule variants.

At B=1, H=12, N=32,760, D=128, bf16, 128x64 tiles, on the video-like heads and random dO of
``bench/gpu.py``'s backward step, beside torch SDPA's cuDNN backward in the same process: the
dK/dV pass of ``gpu/attention_backward_sm90.cu`` rebuilt with each timing-only
``PSA_ABLATE_BWD_*`` macro (``VARIANTS``; the list is in that file's header), timed on the
TopK(0.05) kept set (the sparse default, ``sm90_k64``) and dense (``sm90``). Ablated gradients
are wrong by design; the schedule variants (``SCHEDULES``, ``PSA_BWD_*``) are checked against
the shipped schedule's gradients in the same run. ``--profile`` adds a kernel-by-kernel table (torch.profiler / CUPTI) of
one call in each dQ mode, so the deterministic mode's two passes are seen apart.

    python3 bench/backward_ablation.py [--quick] [--profile] [--once] [--out DIR]

Times: ``triton.testing.do_bench`` medians (queued), as bench/forward_ablation.py. Results: one
JSON line per figure in ``DIR/backward-ablation-<stamp>.jsonl``, a table printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from forward_ablation import _timer  # noqa: E402

from pysparse_attn.bench.results import git_commit  # noqa: E402

#: label -> macros (without the -D) of gpu/attention_backward_sm90.cu's timing variants.
VARIANTS = {
    "baseline": (),
    "no dQ reductions": ("PSA_ABLATE_BWD_NO_DQ_REDUCE",),
    "no dQ (dS store, barrier, product, reductions)": ("PSA_ABLATE_BWD_NO_DQ",),
    "loads off": ("PSA_ABLATE_BWD_NO_LOADS",),
    "exp -> fma": ("PSA_ABLATE_BWD_CHEAP_EXP",),
}

#: label -> macros of its schedule variants: gradients right (checked against the shipped
#: schedule's in the same run: dK/dV bitwise, dQ up to the reductions' order).
SCHEDULES = {
    "dQ product last": ("PSA_BWD_DQ_LAST",),
}


def _agreement(cupy, base, other):
    """'dK/dV bitwise, dQ rel. L2 x' of ``other`` against ``base`` (dq, dk, dv)."""
    from gpu import rel_l2

    same = all(bool(cupy.array_equal(a, b)) for a, b in zip(base[1:], other[1:]))
    return (f"dK/dV {'bitwise' if same else 'DIFFER'}, dQ rel. L2 "
            f"{rel_l2(cupy, other[0], base[0]):.1e}"), same


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 8192")
    parser.add_argument("--profile", action="store_true",
                        help="also a kernel-by-kernel table of one call per dQ mode")
    parser.add_argument("--once", action="store_true",
                        help="one baseline call per case and nothing else (for ncu)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    import cupy

    from gpu import backward_inputs, cudnn_backward_ms, forward_kept_set
    from pysparse_attn._select import TopK
    from pysparse_attn.backends import cupy as backend

    B, H, N, D = (1, 12, 8192, 128) if args.quick else (1, 12, 32760, 128)
    block, scale = (128, 64), D ** -0.5
    timer, how = _timer(cupy)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"backward-ablation-{stamp}.jsonl"
    meta = dict(device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                date=stamp, commit=git_commit(), timer=how,
                command=" ".join(["python3", "bench/backward_ablation.py", *sys.argv[1:]]))
    rows = []

    def record(**fields):
        rows.append(fields)
        with open(path, "a") as f:
            f.write(json.dumps({**meta, **fields}) + "\n")
        print(json.dumps(fields), flush=True)

    q, k, v, do = backward_inputs(cupy, B, H, N, D)
    dense_flops = 2.5 * 4.0 * B * H * N * N * D  # the backward: 2.5x the forward's FLOPs
    try:
        if args.once:
            raise RuntimeError("--once: no anchors")
        record(case="torch sdpa cudnn backward (dense)", variant="-",
               ms=cudnn_backward_ms(cupy, q, k, v, do, 10)[0])
    except Exception as error:
        print(f"no cuDNN baseline: {type(error).__name__}: {error}")
    nk = -(-N // block[1])
    for label, selector, kernel in (("TopK(0.05) replay", TopK(ratio=0.05), "sm90_k64"),
                                    ("dense", None, "sm90")):
        out, lse, kept = forward_kept_set(cupy, backend, q, k, v, block, selector, scale)
        density = float(kept.mean())
        bound = None if selector is None else selector.count(nk) / nk
        if args.once:
            backend.attention_backward(q, k, v, do, kept, block, scale, out=out, lse=lse,
                                       grad_dtype=q.dtype, density=bound, kernel=kernel)
            cupy.cuda.runtime.deviceSynchronize()
            continue
        started = time.time()
        for macros in (*VARIANTS.values(), *SCHEDULES.values()):  # compile before timing
            backend._backward_kernel(cupy.cuda.runtime.getDevice(), "dkdv_accumulate_dq",
                                     "bfloat16", D, kernel, macros)
        print(f"compiled {len(VARIANTS) + len(SCHEDULES)} variants of {kernel} in "
              f"{time.time() - started:.1f} s", flush=True)

        def timed(variant, ms, **fields):
            record(case=label, variant=f"{kernel} {variant}", ms=ms, density=density,
                   tflops=dense_flops * density / (ms * 1e-3) / 1e12, **fields)

        def call(macros=(), deterministic=False, chosen=kernel, addend=None):
            return backend.attention_backward(
                q, k, v, do, kept, block, scale, out=out, lse=lse, grad_dtype=q.dtype,
                deterministic=deterministic, density=bound, kernel=chosen, _ablation=macros,
                addend=addend)
        for name, macros in VARIANTS.items():
            timed(f"reduced dQ: {name}", timer(lambda: call(macros)))
        # With another branch's float32 gradients added in the stores, as sla_vjp calls it.
        rng = cupy.random.default_rng(5)
        addend = tuple(rng.standard_normal(x.shape, dtype=cupy.float32) * 1e-3
                       for x in (q, k, v))
        for extra, suffix in ((None, ""), (addend, " + addend")):
            timed(f"shipped schedule{suffix}", timer(lambda: call(addend=extra)))
            shipped = call(addend=extra)
            for name, macros in SCHEDULES.items():
                agreement, same = _agreement(cupy, shipped, call(macros, addend=extra))
                timed(f"schedule: {name}{suffix}", timer(lambda: call(macros, addend=extra)),
                      agreement=agreement, key_gradients_bitwise=same)
        del addend
        timed("deterministic dQ", timer(lambda: call(deterministic=True)))
        if args.profile:
            import torch
            from profile_sla_step import table

            for deterministic in (False, True):
                table(torch, lambda: call(deterministic=deterministic),
                      f"{label}, {kernel}, {'deterministic' if deterministic else 'reduced'} dQ",
                      rows=8)

    print(f"\n{meta}\n\n| case | variant | ms | TFLOP/s | against the shipped schedule |\n"
          "|---|---|---|---|---|")
    for row in rows:
        tf = row.get("tflops")
        print(f"| {row['case']} | {row['variant']} | {row['ms']:.3f} | "
              f"{'' if tf is None else f'{tf:.0f}'} | {row.get('agreement', '')} |")


if __name__ == "__main__":
    main()
