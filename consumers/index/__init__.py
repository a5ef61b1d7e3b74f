"""The index: the interface every engine implements and the values that cross it
(``interface``), the engines (Qdrant Edge in ``edge``; a Qdrant server or qdrant-client's local
mode in ``qdrant``), and the catalog of collections (``catalog``: the alias, the cards, the
switch and the rollback)."""
