"""Benchmarks (installed as fastcomp.benchmarks): the cases and runner behind `fastcomp bench`, and
pytest-benchmark suites over the same cases (`pytest benchmarks/`)."""
