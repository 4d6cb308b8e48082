"""What `rmbgd check` and `rmbgd run` verify of the `http:` section beyond its syntax: the
packages of the `http` extra, and a usable token file. Imports nothing of the extra."""

from __future__ import annotations

import importlib.util
from typing import Any, List

from rmbgd.api.auth import TokenFileError, read_token

__all__ = ["INSTALL_HINT", "missing_packages", "problems", "warnings"]

INSTALL_HINT = "pip install 'rmbgd[http]'"
# (import name(s), distribution name) of what the HTTP API needs.
_PACKAGES = ((("fastapi",), "fastapi"), (("uvicorn",), "uvicorn"),
             (("python_multipart", "multipart"), "python-multipart"), (("httpx",), "httpx"))


def missing_packages() -> List[str]:
    """The distributions of the `http` extra that cannot be imported."""
    return [dist for names, dist in _PACKAGES if not any(_installed(name) for name in names)]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # an import hook that refuses the name (as a test's hidden package)
        return False


def problems(cfg: Any) -> List[str]:
    """`http.KEY: problem` lines; none when the API is off."""
    if cfg.http.port is None:
        return []
    found = []
    missing = missing_packages()
    if missing:
        found.append(f"http.port: the HTTP API needs {', '.join(missing)}, which is not installed; {INSTALL_HINT}")
    if cfg.http.token_file is not None:
        try:
            read_token(cfg.http.token_file)
        except TokenFileError as exc:
            found.append(str(exc))
    return found


def warnings(cfg: Any) -> List[str]:
    """Worth saying, not refusing: a token file other users can read."""
    if cfg.http.port is None or cfg.http.token_file is None:
        return []
    try:
        warning = read_token(cfg.http.token_file).warning
    except TokenFileError:
        return []
    return [f"http.token_file: {warning}"] if warning else []
