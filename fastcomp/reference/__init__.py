"""Plain-PyTorch references of every fastcomp op: the executable spec, correct in float64.

They are deliberately simple and slow (dense masks, all K candidates, exact Jacobians): every fast
backend is tested against them and every benchmark is measured against them.
"""

from .attention import disk_mask_reference, local_conditional_attention_reference, window_mask, window_starts
from .ddn import ddn_candidates, ddn_gather_reference, ddn_select_reference
from .probe import (conditioner_locality_reference, pixel_locality_colored_reference, pixel_locality_reference,
                    probe_demux_reference)

__all__ = [
    "local_conditional_attention_reference", "disk_mask_reference", "window_mask", "window_starts",
    "ddn_candidates", "ddn_select_reference", "ddn_gather_reference",
    "pixel_locality_reference", "pixel_locality_colored_reference", "conditioner_locality_reference",
    "probe_demux_reference",
]
