"""``python -m pysparse_attn demo``: the main job (see :mod:`pysparse_attn.demo`)."""

import sys

USAGE = """usage: python -m pysparse_attn demo [options]

commands:
  demo    run every method on a video-like workload and print the sparsity/error table
          (python -m pysparse_attn demo --help for options)
benchmarks and sweeps: python -m pysparse_attn.bench --help"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
        return 0
    print(f"unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
