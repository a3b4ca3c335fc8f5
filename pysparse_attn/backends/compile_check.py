"""Compile every GPU kernel instance with nvcc, without a GPU, and report registers and spills.

Run ``python -m pysparse_attn.backends.compile_check``. Each kernel family's instances (the same
table the CuPy backend compiles through NVRTC) are instantiated in one translation unit and
compiled to a cubin for every target architecture (``sm_80`` and ``sm_90`` by default), with
``-Xptxas -v``. The exit status is non-zero when a compilation fails or, with
``--fail-on-spill``, when an instance spills registers. Without ``nvcc`` on the PATH it prints
why and exits 0 (nothing can be checked here).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cupy import (BACKWARD_KERNELS, FORWARD_INSTANCES, FORWARD_SM90_INSTANCES,
                   FORWARD_SM90_WS_INSTANCES, LINEAR_INSTANCES, PLAN_INSTANCES, _source_dirs,
                   backward_instances)

__all__ = ["families", "compile_family", "main"]

DEFAULT_ARCHS = ("sm_80", "sm_90")
#: Families bound to one architecture (wgmma exists only on sm_90a); the backward's from the
#: architecture of its BACKWARD_KERNELS entry.
FIXED_ARCHS = {"attention_forward_sm90.cu": ("sm_90a",),
               "attention_forward_sm90_ws.cu": ("sm_90a",),
               **{family.source: (family.arch,) for family in BACKWARD_KERNELS.values()
                  if family.arch}}
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
# ptxas's notes that it serialised an instance's wgmma pipeline (every wgmma waits for the one
# before): C7515 (a non-wgmma write to an accumulator in flight), C7520 (a dependence on an
# arrive it injected in a divergent path). Either costs the overlap the kernels are built on.
_SERIALISED = re.compile(r"\((C7515|C7520)\).*?function '([^']+)'")


def families():
    """``{source file: [template instance names]}`` of every kernel family."""
    backward = {}
    for name, family in BACKWARD_KERNELS.items():  # the sm90 families share one source
        backward.setdefault(family.source, set()).update(backward_instances(name).values())
    return {"attention_forward.cu": sorted(set(FORWARD_INSTANCES.values())),
            "attention_forward_sm90.cu": sorted(set(FORWARD_SM90_INSTANCES.values())),
            "attention_forward_sm90_ws.cu": sorted(set(FORWARD_SM90_WS_INSTANCES.values())),
            "plan_select.cu": sorted(set(PLAN_INSTANCES.values())),
            "linear_branch.cu": sorted(set(LINEAR_INSTANCES.values())),
            **{source: sorted(names) for source, names in backward.items()}}


def _arch_flag(arch: str) -> str:
    # "-arch=sm_90a" also runs a plain sm_90 pass that rejects wgmma (nvcc 13.0); the gencode
    # form targets the architecture-specific variant alone.
    if arch.endswith("a"):
        number = arch[len("sm_"):]
        return f"-gencode=arch=compute_{number},code={arch}"
    return f"-arch={arch}"


def _source_dir() -> Path:
    for folder in _source_dirs():
        if (folder / "attention_forward.cu").is_file():
            return folder
    raise FileNotFoundError("no gpu/ source folder found")


def _translation_unit(source: str, instances) -> str:
    # Taking each instance's address forces nvcc to instantiate and compile it.
    lines = [f'#include "{source}"', "void* const psa_compile_check_instances[] = {"]
    lines += [f"    (void*)&{name}," for name in instances]
    lines.append("};")
    return "\n".join(lines) + "\n"


def _demangle(names):
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    result = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = result.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def compile_family(nvcc: str, source: str, instances, arch: str):
    """Compile one family for one architecture; returns ``(ok, rows, log)``.

    ``rows`` holds ``(instance, registers, stack bytes, spill stores, spill loads, sass,
    serialised)``; ``sass`` counts matrix and local-memory instructions (None without
    ``cuobjdump``); ``serialised`` names the ptxas notes (C7515, C7520) saying that it
    serialised the instance's wgmma pipeline (empty when it did not).
    """
    folder = _source_dir()
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / "instances.cu"
        unit.write_text(_translation_unit(source, instances))
        command = [nvcc, "-std=c++17", f"-I{folder}", _arch_flag(arch), "-cubin", "-Xptxas", "-v",
                   "-o", str(Path(tmp) / "out.cubin"), str(unit)]
        run = subprocess.run(command, capture_output=True, text=True)
        sass = _sass_counts(Path(tmp) / "out.cubin") if run.returncode == 0 else {}
    log = run.stdout + run.stderr
    rows, current = [], None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = [entry.group(1), None, None, None, None]
            rows.append(current)
            continue
        spill = _SPILL.search(line)
        if spill and current is not None:
            current[2:5] = [int(x) for x in spill.groups()]
        regs = _REGS.search(line)
        if regs and current is not None:
            current[1] = int(regs.group(1))
    serialised = {}
    for code, function in _SERIALISED.findall(log):
        serialised.setdefault(function, set()).add(code)
    names = _demangle([r[0] for r in rows])
    rows = [(names[r[0]], *r[1:], sass.get(r[0]), tuple(sorted(serialised.get(r[0], ()))))
            for r in rows]
    return run.returncode == 0, rows, log


_SASS_OPCODES = ("HGMMA", "HMMA", "LDL", "STL")


def _sass_counts(cubin: Path):
    """``{mangled name: {opcode: count}}`` from ``cuobjdump --dump-sass``, or ``{}`` without it.

    Shows which matrix instructions each instance really uses (HGMMA = wgmma, HMMA = mma.sync)
    and any local-memory traffic (LDL/STL).
    """
    tool = shutil.which("cuobjdump")
    if tool is None:
        return {}
    text = subprocess.run([tool, "--dump-sass", str(cubin)], capture_output=True,
                          text=True).stdout
    counts, current = {}, None
    for line in text.splitlines():
        function = re.search(r"Function : (\S+)", line)
        if function:
            current = counts.setdefault(function.group(1), dict.fromkeys(_SASS_OPCODES, 0))
            continue
        opcode = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", line)
        if opcode and current is not None:
            name = opcode.group(1)
            if name in current:
                current[name] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="target, e.g. sm_86 (repeatable); "
                        f"default {' '.join(DEFAULT_ARCHS)}; the wgmma family is always "
                        "built for sm_90a")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="also fail when an instance spills registers to local memory or "
                             "ptxas serialises its wgmma pipeline")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("compile_check: nvcc is not on the PATH; nothing compiled (install the CUDA "
              "toolkit to check the kernels)")
        return 0
    archs = args.arch or list(DEFAULT_ARCHS)
    jobs = [(source, instances, arch) for source, instances in families().items()
            for arch in FIXED_ARCHS.get(source, archs)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: compile_family(nvcc, *job), jobs))
    failed = flagged = 0
    for (source, instances, arch), (ok, rows, log) in zip(jobs, results):
        print(f"== {source} for {arch}: {len(instances)} instances, "
              f"{'compiled' if ok else 'FAILED'}")
        if not ok:
            failed += 1
            print(log)
            continue
        if len(rows) != len(instances):
            failed += 1
            print(f"   expected {len(instances)} compiled entries, ptxas reported {len(rows)}")
        for name, regs, stack, stores, loads, sass, serial in sorted(rows, key=lambda r: r[0]):
            flag = ("  SPILLS" if (stores or loads) else "") + (
                f"  WGMMA SERIALISED ({', '.join(serial)})" if serial else "")
            flagged += bool(stores or loads or serial)
            short_name = name.split("(")[0]
            opcodes = ("  sass " + " ".join(f"{k}={v}" for k, v in sass.items())) if sass else ""
            print(f"   {regs:4d} regs  stack {stack:5d} B  spill st/ld {stores}/{loads} B  "
                  f"{short_name}{flag}{opcodes}")
    print(f"compile_check: {len(jobs) - failed}/{len(jobs)} family builds ok, "
          f"{flagged} instance(s) with spills or serialised wgmma")
    if failed or (args.fail_on_spill and flagged):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
