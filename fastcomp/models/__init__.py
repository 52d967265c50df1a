"""Generative models built on fastcomp's layers."""

from .ddn import DDN, ColorHintScorer, DDNOutput, InpaintingScorer, SuperResolutionScorer

__all__ = ["DDN", "DDNOutput", "SuperResolutionScorer", "InpaintingScorer", "ColorHintScorer"]
