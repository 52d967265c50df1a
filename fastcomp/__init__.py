"""fastcomp: kernel-accelerated PyTorch ops for compositional generative models.

    fastcomp.local_conditional_attention(q, k, v, kernel_size, *, cond_k, cond_v, cond_mask, scale, backend)
    fastcomp.disk_mask(points, radius, H, W)
    fastcomp.ddn_select(features, weight, target, *, bias, residual, metric) -> (output, index, distances)
    fastcomp.ddn_gather(features, weight, index, *, bias, residual)
    fastcomp.probe.pixel_locality / conditioner_locality

Every op has a plain-PyTorch `reference` backend (fastcomp.reference, the spec); `fastcomp info`
lists the others and whether they can run here.
"""

from . import backends, nn, probe, reference
from .backends import BackendUnavailable
from .ops import DDNSelection, ddn_gather, ddn_select, disk_mask, local_conditional_attention

__version__ = "0.1.0"

__all__ = [
    "local_conditional_attention", "disk_mask", "ddn_select", "ddn_gather", "DDNSelection",
    "BackendUnavailable", "backends", "nn", "probe", "reference", "__version__",
]
