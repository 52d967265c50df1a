"""Plain-PyTorch references of every fastcomp op: the executable spec, correct in float64.

They are deliberately simple and slow (dense masks, all K candidates, exact Jacobians): every fast
backend is tested against them and every benchmark is measured against them. Each op's reference lives
beside its backends, in fastcomp/ops/<op>/reference.py; this package gathers them (and holds the probes').
"""

from ..ops.attention.reference import local_conditional_attention_reference, window_mask, window_starts
from ..ops.ddn.reference import ddn_candidates, ddn_gather_reference, ddn_select_reference
from ..ops.disk_mask.reference import disk_mask_reference
from ..ops.probe_demux.reference import probe_demux_reference
from .probe import conditioner_locality_reference, pixel_locality_colored_reference, pixel_locality_reference

__all__ = [
    "local_conditional_attention_reference", "disk_mask_reference", "window_mask", "window_starts",
    "ddn_candidates", "ddn_select_reference", "ddn_gather_reference",
    "pixel_locality_reference", "pixel_locality_colored_reference", "conditioner_locality_reference",
    "probe_demux_reference",
]
