"""Triton kernels (installed as fastcomp.kernels), one file per op.

Import these modules lazily, only when a Triton backend runs: whether `@triton.jit` builds a compiled or an
interpreted kernel is decided when the module is imported (TRITON_INTERPRET=1 selects the interpreter,
which runs on CPU tensors for tests).
"""
