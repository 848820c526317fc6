"""Fails (exit 1) if any module of the project's packages imports itself through others.

``make lint`` runs it beside import-linter's contracts. The graph comes from grimp (the
library under import-linter); every import counts, ``TYPE_CHECKING`` ones included, since a
cycle there is still a cycle a reader has to hold in mind.
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("realtime", "tts")


def find_cycles(packages: tuple[str, ...] = PACKAGES) -> list[list[str]]:
    graph = grimp.build_graph(*packages)
    cycles: dict[frozenset[str], list[str]] = {}
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycle = [module, *back]
                cycles.setdefault(frozenset(cycle), cycle)
    return list(cycles.values())


def main() -> int:
    cycles = find_cycles()
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    print(f"{len(cycles)} import cycle(s) in {', '.join(PACKAGES)}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
