"""EMO pipeline: the model and its sampler, importable alone."""
