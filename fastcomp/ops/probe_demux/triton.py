"""probe_demux's triton backend: kernels/probe_demux.py, imported on first use (TRITON_INTERPRET is read then)."""

from __future__ import annotations


def launch(*args):
    from ...kernels.probe_demux import probe_demux_triton

    probe_demux_triton(*args)
