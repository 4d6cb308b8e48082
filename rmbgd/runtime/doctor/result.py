"""The one line each doctor check reports."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Result:
    status: str  # OK, WARN, FAIL or SKIP
    name: str
    text: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.text}"
