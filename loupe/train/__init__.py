"""``loupe train``: fit the fusion model to a catalog (source, simulation, features, objective,
trainer, metrics, pipeline)."""
