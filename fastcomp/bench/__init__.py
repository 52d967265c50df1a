"""What `fastcomp bench` runs: the named cases and their providers (cases.py), the timing, memory and
result-file machinery (harness.py), the runner and its command line (runner.py), the attention's extra
rows (attention_extras.py) and the training step it times (train_step.py).

The pytest-benchmark suites and the standalone benchmark scripts over the same cases live in the
repository's benchmarks/ folder and are not installed (`python -m pytest benchmarks/`)."""
