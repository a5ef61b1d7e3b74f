"""The workers: the consume-process-commit loop each one runs (``batch``); the product stage
(``product_stage``: parse, fetch, encode) and the sinks it feeds (``ingest``: the index;
``encode``: the vectors topic, ``vectors``), the index writer that applies that topic
(``index_writer``); the search (``search``, ranking in ``ranking``); and what they follow (the
model in use, ``live_model``; the hand-over after a switch, ``handover``)."""
