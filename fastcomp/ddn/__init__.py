"""DDN training machinery: Split-and-Prune (the layer is fastcomp.nn.DiscreteDistributionLayer, the model
fastcomp.models.DDN)."""

from .split_and_prune import SplitAndPrune, should_split

__all__ = ["SplitAndPrune", "should_split"]
