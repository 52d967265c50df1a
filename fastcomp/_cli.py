"""What every `fastcomp` subcommand shares: one-line errors with exit code 2, and device flags.

An expected failure (a missing or unreadable file, a bad flag value, an unavailable device, a corrupt
checkpoint, input a model refuses) prints one line, ``fastcomp <cmd>: <what> (<how to fix>)``, and exits
with 2; ``--debug`` anywhere on the command line (or FASTCOMP_DEBUG=1) shows the traceback instead.
Anything else (a bug) keeps its traceback and exit code 1.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Callable, Optional

import torch

from .backends import BackendUnavailable


class CommandError(Exception):
    """An expected failure of a subcommand: `what` went wrong, `fix` says how to fix it."""

    def __init__(self, what: str, fix: Optional[str] = None):
        super().__init__(what)
        self.what, self.fix = what, fix


def _expected() -> tuple:
    """Exception types that mean bad input, files or machine, not a bug in fastcomp."""
    kinds = [CommandError, OSError, ValueError, TypeError, RuntimeError, ImportError, EOFError,
             pickle.UnpicklingError, BackendUnavailable, FloatingPointError]
    try:
        from safetensors import SafetensorError
        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(kinds)


def one_line(command: str, error: BaseException) -> str:
    """`fastcomp <command>: <what> (<how to fix>)` on one line."""
    if isinstance(error, CommandError):
        what, fix = error.what, error.fix
    else:
        what = str(error) or type(error).__name__
        if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in what:
            what = f"{error.filename}: {what}"
        fix = None
    what = " ".join(what.split())  # tracebacks of other libraries' messages spread over many lines
    if len(what) > 600:
        what = what[:600] + "..."
    fix = fix or "rerun with --debug for the traceback"
    return f"fastcomp {command}: {what} ({fix})"


def run(command: str, fn: Callable[[list], int], argv: list) -> int:
    """fn(argv) with expected failures turned into one line on stderr and exit code 2."""
    debug = "--debug" in argv or os.environ.get("FASTCOMP_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return int(fn(argv) or 0)
    try:
        return int(fn(argv) or 0)
    except _expected() as e:
        print(one_line(command, e), file=sys.stderr)
        return 2


def device(text: Optional[str], flag: str = "--device") -> torch.device:
    """The device a --device value names, checked to exist here. "cuda" is the current CUDA device, or
    cuda:LOCAL_RANK under torchrun; None: that when CUDA is available, else the CPU."""
    if text is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        text = "cuda"
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise CommandError(f"{flag} {text!r} is not a device ({e})", "use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise CommandError(f"{flag} {text}: CUDA is not available on this machine ({why})",
                               f"use {flag} cpu")
        if dev.index is None:
            local = os.environ.get("LOCAL_RANK")
            dev = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise CommandError(f"{flag} {text}: there are only {torch.cuda.device_count()} CUDA device(s)",
                               f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu" and not hasattr(torch, dev.type):
        raise CommandError(f"{flag} {text}: unknown device type", "use cpu or cuda")
    return dev
