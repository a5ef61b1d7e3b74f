"""Loupe: event-driven visual product search (Kafka in, fused encoder, Qdrant, Kafka out).

The import package's subpackages, by concern:

- ``loupe.schemas``: the event contracts (pydantic models, exported JSON Schemas).
- ``loupe.encoders``: the fused model: preprocessing (bytes to tensors), the towers, the fusion.
- ``loupe.consumers``: the service: Kafka workers, the index, metrics, settings, wiring.
- ``loupe.cli``: the ``loupe`` command line.
- ``loupe.dev``: what a laptop needs instead of infrastructure: a local Kafka broker, the demo
  catalog, a stand-in CDN.
- ``loupe.demo``: ``loupe demo`` and its HTML report.

In the repository ``consumers/``, ``encoders/`` and ``schemas/`` sit at the top level and are
linked into this directory; the wheel ships them inside ``loupe``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loupe-search")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
