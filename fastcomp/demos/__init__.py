"""`fastcomp demo <name>`: small end-to-end demos, one module per demo, each with its own argv parser."""

from __future__ import annotations

from .. import _router

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
    return _router.usage("fastcomp demo", "demo", "demos", DEMOS)


def main(argv=None) -> int:
    return _router.route("fastcomp demo", "demo", "demos", DEMOS, argv)
