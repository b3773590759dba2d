"""Differentiable curvature analysis (SPEC sections 2 and 8).

- :mod:`~fippure.curvature.products`: Hessian-, GGN/true-Fisher- and empirical-Fisher-vector
  products, one-shot or as reusable linearised operators.
- :mod:`~fippure.curvature.trace`: Hutchinson trace and diagonal estimates.
- :mod:`~fippure.curvature.fisher`: FIP's differentiable Fisher-trace penalty (empirical and
  true Fisher) and the exact diagonal empirical Fisher.
- :mod:`~fippure.curvature.eigenvalues`: Lanczos with full reorthogonalisation, top eigenvalues,
  power iteration (largest magnitude, and the largest algebraic eigenvalue by a shift).
- :mod:`~fippure.curvature.density`: spectral density by stochastic Lanczos quadrature.
- :mod:`~fippure.curvature.analysis`: the report behind ``fippure analyze``.
"""

from fippure.curvature.analysis import (
    AnalysisConfig,
    analyze_curvature,
    lambda_max_warnings,
    plot_density,
)
from fippure.curvature.density import (
    SpectralDensity,
    gaussian_density,
    slq_quadrature,
    spectral_density,
)
from fippure.curvature.eigenvalues import (
    PowerIterationResult,
    Tridiagonal,
    lanczos,
    largest_eigenvalue,
    power_iteration,
    top_eigenvalues,
)
from fippure.curvature.fisher import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    per_example_fisher_trace,
    true_fisher_trace,
)
from fippure.curvature.probes import rademacher_like, tree_dot, tree_norm
from fippure.curvature.products import (
    Operator,
    empirical_fisher_vp,
    fisher_vp,
    ggn_vp,
    hvp,
    make_empirical_fisher_operator,
    make_fisher_operator,
    make_ggn_operator,
    make_hvp_operator,
    softmax_hessian_vp,
)
from fippure.curvature.trace import (
    ggn_trace,
    ggn_trace_samples,
    hutchinson_diagonal,
    hutchinson_samples,
    hutchinson_trace,
)

__all__ = [
    "AnalysisConfig",
    "Operator",
    "PowerIterationResult",
    "SpectralDensity",
    "Tridiagonal",
    "analyze_curvature",
    "lambda_max_warnings",
    "empirical_fisher_diagonal",
    "empirical_fisher_trace",
    "per_example_fisher_trace",
    "empirical_fisher_vp",
    "fisher_vp",
    "gaussian_density",
    "ggn_trace",
    "ggn_trace_samples",
    "ggn_vp",
    "hutchinson_diagonal",
    "hutchinson_samples",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "largest_eigenvalue",
    "make_empirical_fisher_operator",
    "make_fisher_operator",
    "make_ggn_operator",
    "make_hvp_operator",
    "plot_density",
    "power_iteration",
    "rademacher_like",
    "slq_quadrature",
    "softmax_hessian_vp",
    "spectral_density",
    "top_eigenvalues",
    "tree_dot",
    "tree_norm",
    "true_fisher_trace",
]
