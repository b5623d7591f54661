"""Rejected samples: counted by reason and kept aside with the reason, never silently dropped."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

EXCERPT = 300


@dataclass
class Reject:
    """One rejected sample."""

    reason: str
    """Short machine-readable reason, e.g. ``invalid_json``, ``duplicate``, ``http_404``."""
    subset: str
    """Subset of the spec."""
    source: str
    """File, URL or key the sample came from."""
    where: str = ""
    """Line number, sample key or index inside the source."""
    detail: str = ""
    """Human explanation (truncated)."""
    excerpt: str = ""
    """The start of the offending input (truncated), for people to look at."""

    def __post_init__(self) -> None:
        self.detail = self.detail[:EXCERPT]
        self.excerpt = self.excerpt[:EXCERPT]


@dataclass
class Rejects:
    """A list of rejects with counts by reason."""

    items: list[Reject] = field(default_factory=list)
    """Every reject, in source order."""

    def add(
        self, reason: str, subset: str, source: str, where: Any = "", detail: str = "", excerpt: Any = ""
    ) -> None:
        """Record one reject."""
        text = excerpt.decode("utf-8", "replace") if isinstance(excerpt, bytes) else str(excerpt)
        self.items.append(Reject(reason, subset, source, str(where), detail, text))

    def counts(self) -> dict[str, int]:
        """Rejects per reason."""
        return dict(sorted(Counter(r.reason for r in self.items).items()))

    def to_rows(self) -> list[dict[str, str]]:
        """Plain dicts, for json lines."""
        return [asdict(r) for r in self.items]

    def extend(self, rows: list[dict[str, str]]) -> None:
        """Add rows produced elsewhere (e.g. by a Ray worker)."""
        self.items.extend(Reject(**row) for row in rows)
