"""Drop-in nn.Modules built on fastcomp.ops (the layers arrive with the fused ops)."""

from .attention import LocalConditionalAttention, NeighborhoodAttention2D

__all__ = ["LocalConditionalAttention", "NeighborhoodAttention2D"]
