"""Make installed packages look absent, whatever this machine has installed.

`python -m tests.support.hidepkgs timm,kornia,einops -- -m rmbgd run ...` runs the rest of
the command line (a module, as `python -m` would) with those packages hidden; `hidden()`
does the same inside a test. A test of "package X is missing" then runs on every machine,
not only where X happens to be absent.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import runpy
import sys
from typing import Iterable, Iterator


class HiddenPackages(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: importing one of `names` (or below) fails as if not installed."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


@contextlib.contextmanager
def hidden(names: Iterable[str]) -> Iterator[None]:
    """Hide `names` in this interpreter for the duration, already-imported ones included."""
    finder = HiddenPackages(names)
    imported = {
        key: module for key, module in sys.modules.items() if key.split(".", 1)[0] in finder.names
    }
    for key in imported:
        del sys.modules[key]
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.modules.update(imported)


def main(argv: list) -> None:
    names, separator, rest = argv[0], argv[1], argv[2:]
    if separator != "--" or rest[:1] != ["-m"] or len(rest) < 2:
        raise SystemExit("usage: python -m tests.support.hidepkgs NAME[,NAME...] -- -m MODULE [ARGS...]")
    sys.meta_path.insert(0, HiddenPackages(names.split(",")))
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
