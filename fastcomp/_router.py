"""Routing `fastcomp demo <name>` and `fastcomp study <name>`: a table of name -> (module with a
main(argv) -> int, one-line description), a usage text listing it, and the dispatch."""

from __future__ import annotations

import importlib
import sys


def usage(prog: str, noun: str, plural: str, table: dict, width: int = 10) -> str:
    lines = [f"usage: {prog} <name> [options]", "", f"{plural}:"]
    lines += [f"  {name:<{width}} {desc}" for name, (_, desc) in table.items()]
    lines += ["", f"`{prog} <name> --help` shows a {noun}'s options."]
    return "\n".join(lines)


def route(prog: str, noun: str, plural: str, table: dict, argv=None, width: int = 10) -> int:
    """Run table[argv[0]]'s main(argv[1:]); no name or -h lists the table; an unknown name exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    text = usage(prog, noun, plural, table, width)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(text)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown {noun} {name!r}\n\n{text}", file=sys.stderr)
        return 2
    module = importlib.import_module(table[name][0])
    return int(module.main(rest) or 0)
