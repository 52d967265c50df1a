"""DDN training machinery: Split-and-Prune (the layer is fastcomp.nn.DiscreteDistributionLayer, the model
fastcomp.models.DDN)."""

from .split_and_prune import CRITERIA, SplitAndPrune, sddn_split_decision, sddn_split_statistics, should_split

__all__ = ["SplitAndPrune", "CRITERIA", "should_split", "sddn_split_decision", "sddn_split_statistics"]
