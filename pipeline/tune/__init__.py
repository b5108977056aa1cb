"""Tune stage: a Ray Tune sweep over beta schedules, latent dimensions and learning rates (see README,
Hyper-parameter search). ``space``: the trials' values from the search space; ``stopping``: ASHA decisions
that end a trial at an epoch boundary; ``tracking``: the sweep's MLflow runs; ``sweep``: the trials and the
driver.

    python -m pipeline.tune [--params params.yaml] [--only-if-used]
"""
