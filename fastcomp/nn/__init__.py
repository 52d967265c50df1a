"""Drop-in nn.Modules built on fastcomp.ops (the layers arrive with the fused ops)."""

from .ddl import DDLOutput, DiscreteDistributionLayer  # noqa: E402
