"""Jacobian locality probes: how far a score model's output at a pixel depends on other pixels and on
each conditioner.

    pixel_locality(fn, x, *, radius, method="auto") -> PixelLocality        (pixel.py)
    conditioner_locality(fn, x, cond, cond_mask)    -> ConditionerLocality  (conditioner.py)
    locality_vs_noise(denoiser, x0, sigmas, *, radius) -> NoiseLocality     (noise.py)

The probes run batched and chunked (_engine.py) and are reduced to the profile by the fused probe_demux
op (C++ on CPU, Triton on CUDA; _demux.py). The result types live beside the spec, in
fastcomp.reference.probe_results: the fast path imports the reference, never the other way round.
"""

from ..reference.probe_results import ConditionerLocality, PixelLocality
from ..ops.probe_demux import Demuxed, probe_demux  # noqa: F401  (Demuxed: probe_demux's result type)
from ._engine import MODES  # noqa: F401
from .conditioner import COND_METHODS, conditioner_locality  # noqa: F401
from .noise import NoiseLocality, locality_vs_noise
from .pixel import METHODS, ON_LEAKAGE, LeakageWarning, NonFiniteJacobianWarning, pixel_locality  # noqa: F401

__all__ = ["pixel_locality", "conditioner_locality", "locality_vs_noise", "PixelLocality", "ConditionerLocality",
           "NoiseLocality", "LeakageWarning", "NonFiniteJacobianWarning", "probe_demux", "METHODS"]
