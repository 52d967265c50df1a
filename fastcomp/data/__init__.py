"""Data generated on the fly (seeded, no downloads) for the compositional-generalization experiments.

    GaussianBumps(size=32, width=1.5, held_out="default", seed=0)     one bump per image, held-out combos
    bump_accuracy(images, points, *, tolerance=2.0) -> BumpAccuracy
    ShapeScenes(size=32, min_objects=1, max_objects=3, labelling="all"|"one", radius=3, seed=0)
    request_locations(n, num_objects, *, size=32, max_objects=None, radius=3, generator=None)
    detect_objects(images, *, threshold=None, min_area=None) -> list of [k_i, 2] centroids
    length_generalization(images, points, valid, *, tolerance=None) -> Match
    request_recall(images, points, valid, *, tolerance=None) -> RequestRecall (found, extras per image)
    plot_grid(images, points=None, valid=None, path=None, ncol=8)     (needs matplotlib)
"""

from ._common import SceneBatch
from .bumps import BumpAccuracy, GaussianBumps, bump_accuracy
from .detect import Match, RequestRecall, detect_objects, length_generalization, request_recall
from .plot import plot_grid
from .scenes import ShapeScenes, render_shapes, request_locations

__all__ = ["SceneBatch", "GaussianBumps", "BumpAccuracy", "bump_accuracy", "ShapeScenes", "request_locations",
           "render_shapes", "detect_objects", "Match", "length_generalization", "RequestRecall", "request_recall",
           "plot_grid"]
