"""Who is calling: the verified API key of a request, as every chorus HTTP service sees it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    key_id: str
    owner: str
    scopes: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def owner_filter(self) -> str | None:
        """The owner whose objects this key may see; None: every owner's (admin)."""
        return None if self.is_admin else self.owner
