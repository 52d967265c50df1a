"""`fastcomp demo <name>`: small end-to-end demos, one module per demo, each with its own argv parser."""

from __future__ import annotations

import importlib
import sys

# name -> (module with a main(argv) -> int, one-line description). Add a demo by adding a line.
DEMOS = {
    "ddn": ("fastcomp.demos.ddn", "train a small DDN on scikit-learn's digits; PNGs of samples, "
                                  "reconstructions, guided super-resolution, hit frequencies"),
    "bumps": ("fastcomp.demos.bumps", "train a conditional diffusion model on Gaussian bumps; accuracy at "
                                      "held-out (x, y) combinations"),
    "length-generalization": ("fastcomp.demos.length_generalization",
                              "Bradley's experiments 1-3 on ShapeScenes: global vs local models trained on 1-3 "
                              "objects, asked for 0-6; scores, locality probes, sample grids"),
}


def usage() -> str:
    lines = ["usage: fastcomp demo <name> [options]", "", "demos:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in DEMOS.items()]
    lines += ["", "`fastcomp demo <name> --help` shows a demo's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in DEMOS:
        print(f"fastcomp demo: unknown demo {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(DEMOS[name][0])
    return int(module.main(rest) or 0)
