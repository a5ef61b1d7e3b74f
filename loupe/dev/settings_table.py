"""The README's settings table, written from ``Settings`` (each field's description and default).

``python -m loupe.dev.settings_table`` rewrites the table between its two markers in README.md;
a unit test fails when the two disagree, so a setting cannot be added without its line.
"""

from __future__ import annotations

import inspect
import re
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
    if isinstance(value, tuple):  # written as its environment variable takes it
        return f"`{','.join(map(str, value))}`"
    return f"`{value}`"


# ``Settings`` groups its fields by concern under comments of this form; they head the tables.
SECTION = re.compile(r"^    # --- (.+) ---$")
FIELD = re.compile(r"^    (\w+): ")


def sections() -> list[tuple[str, list[str]]]:
    """The settings by concern: each section comment of ``Settings`` with the fields declared
    under it, in order (the fields before the first: "Where Loupe keeps its state")."""
    found: list[tuple[str, list[str]]] = [("Where Loupe keeps its state", [])]
    for line in inspect.getsource(Settings).splitlines():
        if heading := SECTION.match(line):
            title = heading.group(1)
            found.append((title[0].upper() + title[1:], []))
        elif (field := FIELD.match(line)) and field.group(1) in Settings.model_fields:
            found[-1][1].append(field.group(1))
    return [(title, names) for title, names in found if names]


def render() -> str:
    """A table per concern, one row per setting, in the order ``Settings`` declares them."""
    prefix = Settings.model_config["env_prefix"]
    parts = []
    for title, names in sections():
        rows = [f"### {title}", "", "| setting | default | what it does |", "|---|---|---|"]
        for name in names:
            description = Settings.model_fields[name].description
            rows.append(f"| `{prefix}{name.upper()}` | {_default(name)} | {description} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


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
