"""Stage 4, outer: what is done with the parameters left after the random effects are integrated out: optimised
(Newton), integrated on a grid or design (INLA's strategies), or sampled (NUTS over the Laplace marginal).
"""
