"""Write the example notebooks (unexecuted) from the cells below: ``python examples/build_notebooks.py``.

Keeping the cells here makes the notebooks reviewable as code; ``run_all.py`` executes them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

BIOASSAY = [
    new_markdown_cell(
        "# Bioassay: the Laplace approximation and when not to trust it\n\n"
        "BDA3 chapter 4 (seed 001). The Laplace approximation replaces the posterior by a Gaussian at its mode\n"
        "with covariance equal to the inverse of the negative Hessian there. `fit_laplace` finds the mode by\n"
        "Newton's method with exact derivatives and returns the same object as `pm.sample`, so it can be put\n"
        "beside the exact (grid) posterior and NUTS."
    ),
    new_code_cell(
        "import warnings\n"
        "import numpy as np\n"
        "import matplotlib.pyplot as plt\n"
        "import pymc as pm\n"
        "from pymc_laplace import fit_laplace, importance_resample\n"
        "from pymc_laplace import get_group\n"
        "from bioassay import bioassay_model, grid_posterior, load_data\n\n"
        "data = load_data()\n"
        "data"
    ),
    new_markdown_cell("## Flat prior: mode, standard deviations, correlation"),
    new_code_cell(
        "flat = fit_laplace(bioassay_model(data, 'flat'), random_seed=1, progressbar=False)\n"
        "fit = get_group(flat, 'fit')\n"
        "mode, cov = fit['mean_vector'].values, fit['covariance_matrix'].values\n"
        "sd = np.sqrt(np.diag(cov))\n"
        "print('mode', mode.round(4), 'sd', sd.round(3), 'corr', round(cov[0, 1] / sd.prod(), 3))"
    ),
    new_markdown_cell(
        "## The leak into beta < 0\n\nThe Gaussian has unbounded support; the exact posterior puts essentially\n"
        "no mass on beta < 0. LD50 = -alpha/beta explodes for those draws."
    ),
    new_code_cell(
        "grid = grid_posterior(data)\n"
        "beta = get_group(flat, 'posterior')['beta'].values.ravel()\n"
        "print('Laplace P(beta < 0) =', np.mean(beta < 0), ' exact:', np.mean(grid['beta'] < 0))\n"
        "for name, b in [('exact', grid['beta']), ('Laplace', beta)]:\n"
        "    print(name, '95% interval of beta', np.quantile(b, [0.025, 0.975]).round(2))"
    ),
    new_markdown_cell(
        "## Two remedies\n\n1. Fit in (alpha, log beta): declare beta positive (`HalfFlat`, same flat prior);\n"
        "the Gaussian is then built on log beta.\n"
        "2. Pareto-smoothed importance resampling: weights p/q from `log_p` and `log_q`; k-hat above 0.7 says\n"
        "the Gaussian is too far from the posterior for the correction to be trusted."
    ),
    new_code_cell(
        "log_beta = fit_laplace(bioassay_model(data, 'log_beta'), random_seed=2, progressbar=False)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore', UserWarning)\n"
        "    corrected = importance_resample(flat, random_seed=3)\n"
        "corrected_log = importance_resample(log_beta, random_seed=4)\n"
        "for name, res in [('(alpha, beta)', corrected), ('(alpha, log beta)', corrected_log)]:\n"
        "    print(name, 'k-hat', round(get_group(res, 'posterior').attrs['pareto_k'], 2))\n"
        "bins = np.linspace(-10, 45, 111)\n"
        "fig, ax = plt.subplots(figsize=(8, 4))\n"
        "for name, b in [('exact', grid['beta']), ('Laplace', beta),\n"
        "                ('Laplace + PSIS', get_group(corrected, 'posterior')['beta'].values.ravel()),\n"
        "                ('Laplace (alpha, log beta)', get_group(log_beta, 'posterior')['beta'].values.ravel())]:\n"
        "    ax.hist(b, bins=bins, density=True, histtype='step', label=name)\n"
        "ax.set(xlabel='beta', ylabel='density'); ax.legend();"
    ),
    new_markdown_cell("## Beside NUTS (weak prior)"),
    new_code_cell(
        "with bioassay_model(data, 'weak'):\n"
        "    nuts = pm.sample(draws=500, tune=500, chains=2, cores=1, random_seed=5, progressbar=False)\n"
        "weak = fit_laplace(bioassay_model(data, 'weak'), random_seed=6, progressbar=False)\n"
        "for name, res in [('NUTS', nuts), ('Laplace', weak)]:\n"
        "    b = get_group(res, 'posterior')['beta'].values.ravel()\n"
        "    print(name, 'beta 95%:', np.quantile(b, [0.025, 0.975]).round(2))"
    ),
]

RANDOM_EFFECTS = [
    new_markdown_cell(
        "# Random effects integrated out: cbpp, two sites (seed 000), urchins (seed 002)\n\n"
        "`fit_integrated_laplace(model, random=[...])` integrates the named latent variables out by an inner\n"
        "Newton solve and maximises the Laplace marginal likelihood of the rest with its exact gradient, as TMB\n"
        "does. The structure of the Hessian in the random effects is read off the model graph, so the cost\n"
        "grows linearly with the number of groups."
    ),
    new_code_cell(
        "import numpy as np\n"
        "from pymc_laplace import fit_integrated_laplace, marginal, summary\n"
        "from pymc_laplace import get_group\n"
        "from random_effects import cbpp_model, two_site_model, urchin_model, SEED_000_BETA, aghq_log_marginal"
    ),
    new_markdown_cell("## cbpp (glmmTMB: logLik -92.026282, herd SD 0.64226167)"),
    new_code_cell(
        "cbpp = fit_integrated_laplace(cbpp_model(), random=['u'], random_seed=1, progressbar=False)\n"
        "print('logLik', float(get_group(cbpp, 'fit')['log_marginal_likelihood']))\n"
        "summary(cbpp)"
    ),
    new_markdown_cell(
        "## Seed 000: two sites, tau = 1\n\nThe seed's hand-derived Newton stops short of the optimum: compare\n"
        "the Laplace marginal at its printed beta and at ours, and with 25-node adaptive quadrature."
    ),
    new_code_cell(
        "two = fit_integrated_laplace(two_site_model(1.0), random=['mu'], random_seed=2, progressbar=False)\n"
        "beta = get_group(two, 'fit')['mean_vector'].values\n"
        "laplace = marginal(two_site_model(1.0), random=['mu'])\n"
        "print('Laplace log marginal: ours', laplace.value(beta), ' seed', laplace.value(SEED_000_BETA))\n"
        "print('AGHQ-25 log marginal at ours', aghq_log_marginal(beta, 25))"
    ),
    new_markdown_cell("## Seed 002: urchins, Laplace AIC at the seed's published optimum (TMB: 196.7140)"),
    new_code_cell(
        "urchins = marginal(urchin_model(), random=['log_g', 'log_p'])\n"
        "theta = np.array([-4.0676, -0.18946, -1.81267, 0.16382, -1.62341, -1.21295])\n"
        "print('AIC', 2 * (-urchins.value(theta)) + 12)"
    ),
    new_markdown_cell(
        "## A random walk: one connected block, sparse Cholesky\n\nA Gaussian random walk observed with noise\n"
        "couples all its states (a tridiagonal Hessian, found from the graph). The Laplace approximation is exact\n"
        "here, so the marginal must equal the multivariate normal density of the data."
    ),
    new_code_cell(
        "import pymc as pm\n"
        "from scipy import stats\n"
        "rng = np.random.default_rng(11)\n"
        "n = 400\n"
        "y = np.cumsum(rng.normal(0.0, 0.3, n)) + rng.normal(0.0, 0.5, n)\n"
        "with pm.Model() as walk_model:\n"
        "    sigma_walk = pm.HalfNormal('sigma_walk', 1.0)\n"
        "    sigma_obs = pm.HalfNormal('sigma_obs', 1.0)\n"
        "    x = pm.GaussianRandomWalk('x', sigma=sigma_walk, init_dist=pm.Normal.dist(0.0, 1.0), steps=n - 1)\n"
        "    pm.Normal('y', x, sigma_obs, observed=y)\n"
        "walk = marginal(walk_model, random=['x'])\n"
        "structure = walk.structure\n"
        "print(type(structure).__name__, structure.backend, '; colours:', structure.colors.max() + 1)\n"
        "t = np.arange(n)\n"
        "cov = 1.0 + 0.3**2 * np.minimum.outer(t, t) + 0.5**2 * np.eye(n)\n"
        "exact = stats.multivariate_normal(np.zeros(n), cov).logpdf(y)\n"
        "print('Laplace', walk.value(np.log([0.3, 0.5])), ' exact', exact)"
    ),
]


def main() -> None:
    for name, cells in {"bioassay": BIOASSAY, "random_effects": RANDOM_EFFECTS}.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
