"""`fastcomp study <name>`: experiments over many models that cache each model, then relate the models'
measured properties to their behaviour. One module per study, each with its own argv parser."""

from __future__ import annotations

from .. import _router

# name -> (module with a main(argv) -> int, one-line description). Add a study by adding a line.
STUDIES = {
    "length-generalization": ("fastcomp.study.length_generalization",
                              "four global conditioning designs and their local-conditioner interventions on "
                              "ShapeScenes: generalization to 0-8 objects against measured locality"),
}


def usage() -> str:
    return _router.usage("fastcomp study", "study", "studies", STUDIES, width=22)


def main(argv=None) -> int:
    return _router.route("fastcomp study", "study", "studies", STUDIES, argv, width=22)
