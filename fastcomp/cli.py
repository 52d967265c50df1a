"""`fastcomp` command line: info, bench, build, demo, study, probe, train.

Each subcommand lives in its own module and takes its own argv, so `fastcomp bench --help` shows the
bench options; this file only routes.
"""

from __future__ import annotations

import sys

USAGE = """usage: fastcomp <command> [options]

commands:
  info     which backends of every op can run on this machine, and why not
  bench    benchmark every op's backends against the reference (--quick, --op, --device, --dtype)
  build    compile the C++/CUDA extensions now instead of on first use
  demo     end-to-end demos (`fastcomp demo ddn`; `fastcomp demo --help` lists them)
  study    experiments over many models (`fastcomp study length-generalization`; `--help` lists them)
  probe    Jacobian locality of a saved model (torch.save'd module or TorchScript): profile, radii, PNG
  train    train a conditional diffusion model on bumps or shape scenes (DDP under torchrun)

`fastcomp <command> --help` shows a command's options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        from .info import main as run
    elif command == "bench":
        from .benchmarks.runner import main as run
    elif command == "build":
        from ._build import main as run
    elif command == "demo":
        from .demos import main as run
    elif command == "study":
        from .study import main as run
    elif command == "probe":
        from .probe.cli import main as run
    elif command == "train":
        from .train.cli import main as run
    else:
        print(f"fastcomp: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
