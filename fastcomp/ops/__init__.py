"""Public functional ops. Each validates its inputs, then dispatches to a backend (fastcomp.backends)."""

from .attention import local_conditional_attention
from .ddn import DDNSelection, ddn_gather, ddn_select
from ._outputs import cpu_cache_info, release_cpu_cache
from .disk_mask import disk_mask

__all__ = ["local_conditional_attention", "disk_mask", "ddn_select", "ddn_gather", "DDNSelection",
           "cpu_cache_info", "release_cpu_cache"]
