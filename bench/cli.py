"""What every benchmark's command line shares."""

from __future__ import annotations


def summary(doc: str | None) -> str:
    """The first paragraph of a module's docstring, as one line for ``--help``."""
    return " ".join((doc or "").split("\n\n")[0].split())
