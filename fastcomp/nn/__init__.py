"""Drop-in nn.Modules built on fastcomp.ops (the layers arrive with the fused ops)."""

from .attention import LocalConditionalAttention, NeighborhoodAttention2D
from .ddl import DDLOutput, DiscreteDistributionLayer

__all__ = ["LocalConditionalAttention", "NeighborhoodAttention2D", "DiscreteDistributionLayer", "DDLOutput"]
