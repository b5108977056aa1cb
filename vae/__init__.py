"""VAE model library: pure PyTorch (+ numpy). No ray/mlflow/dvc imports, so it runs anywhere torch does.

Modules (import from them directly; the package itself imports nothing, so that importing one module - the
config's ``vae.schedules`` - does not load the others): distributions (q(z|x), prior), likelihoods (p(x|z)),
networks (MLP/conv/residual), model (VAE), objectives (IWAE bound, importance-sampled log p(x), bits/dim,
active units), schedules (beta), latent (interpolation, traversal, attribute vectors).
"""
