"""Loaded at start-up by every Python the tests launch (this folder is on PYTHONPATH).

Installs tests/support/netguard.py when RMBGD_NETGUARD_REPORT is set, then runs the
sitecustomize this file shadows, if the interpreter has one.
"""

import importlib.machinery
import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if os.environ.get("RMBGD_NETGUARD_REPORT"):
    _load("_rmbgd_netguard", os.path.join(os.path.dirname(_here), "netguard.py")).install()

_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_shadowed = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _shadowed is not None and _shadowed.origin:
    _load("_shadowed_sitecustomize", _shadowed.origin)
