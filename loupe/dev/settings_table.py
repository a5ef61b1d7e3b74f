"""The README's settings table, written from ``Settings`` (each field's description and default).

``python -m loupe.dev.settings_table`` rewrites the table between its two markers in README.md;
a unit test fails when the two disagree, so a setting cannot be added without its line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from loupe.consumers.settings import Settings

BEGIN = "<!-- settings table: written by `python -m loupe.dev.settings_table` -->"
END = "<!-- end of the settings table -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None or field.default is PydanticUndefined:
        return "see description"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and not value:
        return '""'
    return f"`{value}`"


def render() -> str:
    """The table, one row per setting, in the order ``Settings`` declares them."""
    prefix = Settings.model_config["env_prefix"]
    rows = ["| setting | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `{prefix}{name.upper()}` | {_default(name)} | {field.description} |")
    return "\n".join(rows)


def rewrite(text: str) -> str:
    """``text`` (the README) with the table between the markers replaced by ``render()``."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{render()}\n{text[end:]}"


def main() -> int:
    before = README.read_text()
    after = rewrite(before)
    if after != before:
        README.write_text(after)
        print(f"wrote the settings table into {README}")
    else:
        print(f"the settings table in {README} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
