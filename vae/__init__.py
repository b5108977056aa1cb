"""VAE model library: pure PyTorch (+ numpy). No ray/mlflow/dvc imports, so it runs anywhere torch does.

Modules: distributions (q(z|x), prior), likelihoods (p(x|z)), networks (MLP/conv/residual), model (VAE),
objectives (IWAE bound, importance-sampled log p(x), bits/dim, active units), schedules (beta), latent
(interpolation, traversal, attribute vectors).
"""

from vae.distributions import DiagonalGaussian, standard_normal_log_prob
from vae.likelihoods import LIKELIHOODS, Likelihood, make_likelihood
from vae.model import VAE, ELBOObjective, ELBOTerms
from vae.objectives import active_units, bits_per_dim, importance_sampled_log_likelihood, iwae_bound
from vae.schedules import SCHEDULES, kl_penalty, make_schedule

__all__ = [
    "VAE", "ELBOObjective", "ELBOTerms", "DiagonalGaussian", "Likelihood", "LIKELIHOODS", "SCHEDULES",
    "active_units", "bits_per_dim", "importance_sampled_log_likelihood", "iwae_bound", "kl_penalty",
    "make_likelihood", "make_schedule", "standard_normal_log_prob",
]
