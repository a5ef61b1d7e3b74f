"""The service: the ``Application`` that builds every part from the settings (``app``),
``loupe serve``'s lifecycle (``lifecycle``: workers, readiness, supervision, shutdown), the
reindex (``reindex``, with its lock and progress), and signal handling (``signals``)."""
