"""probe_demux's cpu backend: the C++ kernel of csrc/probe_demux/probe_cpu.cpp."""

from __future__ import annotations


def launch(*args):
    from ... import _build

    _build.load("probe_demux").probe_demux_cpu(*args)
