"""Stage 6, report: what a user reads to judge a fit: the tables of estimates (tables), the Pareto-k check of the
Gaussian (diagnostics) and the simulation check of the Laplace marginal (consistency).
"""
