"""Export the contract as JSON Schema files (``schemas/json``) and detect drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from loupe.schemas.products import PRODUCT_EVENT_ADAPTER
from loupe.schemas.search import SEARCH_REQUEST_ADAPTER, SEARCH_RESPONSE_ADAPTER

JSON_DIR = Path(__file__).resolve().parent / "json"

SCHEMAS: dict[str, tuple[TypeAdapter[Any], str]] = {
    "product-event": (PRODUCT_EVENT_ADAPTER, "loupe.products.v1 message value"),
    "search-request": (SEARCH_REQUEST_ADAPTER, "loupe.search.requests.v1 message value"),
    "search-response": (SEARCH_RESPONSE_ADAPTER, "loupe.search.responses.v1 message value"),
}


def render(name: str) -> str:
    adapter, title = SCHEMAS[name]
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://loupe.dev/schemas/v1/{name}.schema.json",
        "title": title,
        **adapter.json_schema(mode="validation"),
    }
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(directory: Path = JSON_DIR) -> list[Path]:
    """Write every schema; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = directory / f"{name}.schema.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


def drifted(directory: Path = JSON_DIR) -> list[str]:
    """Names whose committed schema differs from what the models produce now."""
    stale = []
    for name in SCHEMAS:
        path = directory / f"{name}.schema.json"
        if not path.exists() or path.read_text(encoding="utf-8") != render(name):
            stale.append(name)
    return stale
