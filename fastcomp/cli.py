"""`fastcomp` command line: info, bench, build, demo, study, probe, train.

Each subcommand lives in its own module and takes its own argv, so `fastcomp bench --help` shows the
bench options; this file only routes, through fastcomp._cli.run (one-line errors, --debug).
"""

from __future__ import annotations

import importlib
import sys

from . import _cli

USAGE = """usage: fastcomp <command> [options]

commands:
  info     which backends of every op can run on this machine, and why not
  bench    benchmark every op's backends against the reference (--quick, --op, --device, --dtype)
  build    compile the C++/CUDA extensions now instead of on first use
  demo     end-to-end demos (`fastcomp demo ddn`; `fastcomp demo --help` lists them)
  study    experiments over many models (`fastcomp study length-generalization`; `--help` lists them)
  probe    Jacobian locality of a saved model (torch.save'd module or TorchScript): profile, radii, PNG
  train    train a conditional diffusion model on bumps or shape scenes (DDP under torchrun)

`fastcomp <command> --help` shows a command's options. An expected failure prints one line,
`fastcomp <command>: <what> (<how to fix>)`, and exits with 2; --debug shows its traceback instead."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    debug = [a for a in argv if a == "--debug"]  # `fastcomp --debug probe ...` works too
    argv = [a for a in argv if a != "--debug"]
    if not argv:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastcomp: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2

    def run(args: list) -> int:
        module = importlib.import_module(COMMANDS[command], __package__)
        return module.main(args)

    return _cli.run(command, run, rest + debug)


# command -> the module whose main(argv) runs it
COMMANDS = {"info": ".info", "bench": ".bench.runner", "build": "._build", "demo": ".demos",
            "study": ".study", "probe": ".probe.cli", "train": ".train.cli"}


if __name__ == "__main__":
    sys.exit(main())
