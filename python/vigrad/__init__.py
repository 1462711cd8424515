"""vigrad: fast, exact-to-the-bit gradient estimators for Gaussian variational inference.

The C++ core (``vigrad._core``) samples, evaluates log-densities and computes the
pathwise (Blundell et al. 2015, Proposition 1) and score-function gradients for
mean-field Gaussian families; ``vigrad.reference`` is a pure-NumPy twin of every
kernel that the tests hold the core to.
"""

from . import _core
from ._validation import max_workers
from . import cavi, data, datasets, diagnostics, metrics, optim, reference
from .distributions import MeanFieldGaussian, Normal, ScaleMixtureNormal, kl_divergence
from .estimators import ElboGrad, elbo_grad, pathwise_grad, score_grad
from .families import FullRankGaussian, LowRankGaussian
from .bbvi import FitError, FitResult, fit
from .vi import VI
from . import vi
from .bnn import BayesianLinear, BayesianMLP

__version__ = "0.1.0"

#: True when the core was built with OpenMP threads.
has_openmp: bool = bool(_core.has_openmp)

#: How the core was built and which kernels run: compiler, flags, OpenMP, libmvec;
#: ``"isa"``, the instruction-set level the kernels run on (chosen at import: the best of
#: ``"isa_supported"``, or the one the environment variable ``VIGRAD_ISA`` names);
#: ``"isa_available"``, the levels built in, lowest first; ``"instruction_set"``, the widest
#: vector extension the running level was compiled for.
build_info: dict = dict(_core.build_info)

__all__ = [
    "__version__",
    "has_openmp",
    "max_workers",
    "build_info",
    "MeanFieldGaussian",
    "Normal",
    "ScaleMixtureNormal",
    "kl_divergence",
    "ElboGrad",
    "elbo_grad",
    "pathwise_grad",
    "score_grad",
    "FullRankGaussian",
    "LowRankGaussian",
    "fit",
    "FitResult",
    "FitError",
    "VI",
    "vi",
    "optim",
    "data",
    "diagnostics",
    "metrics",
    "cavi",
    "BayesianLinear",
    "BayesianMLP",
]
