"""Generative models built on fastcomp's layers."""

from .ddn import DDN, ColorHintScorer, DDNOutput, InpaintingScorer, SuperResolutionScorer

__all__ = ["DDN", "DDNOutput", "SuperResolutionScorer", "InpaintingScorer", "ColorHintScorer"]
from .diffusion import ConditionalDenoiser
from .edm import LaplaceLogSNR, LogNormalSigma, edm_loss
from .sampling import composed_sample, edm_sigmas, sample

__all__ += ["ConditionalDenoiser", "LogNormalSigma", "LaplaceLogSNR", "edm_loss", "sample", "composed_sample",
            "edm_sigmas"]
from .variants import VARIANTS, UNetDenoiser, VectorDenoiser, build_denoiser

__all__ += ["VARIANTS", "build_denoiser", "UNetDenoiser", "VectorDenoiser"]
