"""Pure-NumPy twins of every kernel in ``vigrad._core``, with the same names and signatures.

Written for clarity, not speed, and independently of the C++ (log-sum-exp through
``np.logaddexp``, the mixture gradient through responsibilities, Proposition 1 in
its textbook form); the tests hold the core to these functions on the same noise.
Results are computed in float64 and returned in the input dtype.
"""

from ._kernels import (
    fullrank_affine,
    fullrank_sample,
    fullrank_log_prob,
    fullrank_pathwise_grad,
    lowrank_affine,
    lowrank_sample,
    lowrank_log_prob,
    lowrank_entropy,
    lowrank_pathwise_grad,
    pathwise_grad_flat,
    kl_mf_normal,
    mf_entropy,
    mf_log_prob,
    mixture_grad_log_prob,
    mixture_log_prob,
    normal_grad_log_prob,
    normal_log_prob,
    pathwise_grad_mixture,
    pathwise_grad_normal,
    philox4x32_10,
    sample,
    score_grad,
    sigmoid,
    softplus,
    softplus_inv,
    standard_normal,
)

__all__ = [
    "fullrank_affine",
    "fullrank_sample",
    "fullrank_log_prob",
    "fullrank_pathwise_grad",
    "lowrank_affine",
    "lowrank_sample",
    "lowrank_log_prob",
    "lowrank_entropy",
    "lowrank_pathwise_grad",
    "pathwise_grad_flat",
    "kl_mf_normal",
    "mf_entropy",
    "mf_log_prob",
    "mixture_grad_log_prob",
    "mixture_log_prob",
    "normal_grad_log_prob",
    "normal_log_prob",
    "pathwise_grad_mixture",
    "pathwise_grad_normal",
    "philox4x32_10",
    "sample",
    "score_grad",
    "sigmoid",
    "softplus",
    "softplus_inv",
    "standard_normal",
]
