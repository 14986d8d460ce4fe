"""Stages 2-3, inner solve -> marginal: the random effects integrated out given the outer parameters (the inner
Newton solve, the Laplace marginal and its exact gradient, quadrature beyond Laplace) and the linear algebra of
their precision matrix.
"""
