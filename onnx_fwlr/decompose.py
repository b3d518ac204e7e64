"""Decomposing every site once: the expensive, budget-independent step."""

from __future__ import annotations

from tqdm.auto import tqdm

from . import factorize
from .sites import Site, weight_matrix


def decompose_sites(model, sites: list[Site], site_methods: dict[str, str], stats, scalings, progress: bool = True):
    """weight name -> (float64 W [K, N], Decomposition) for every site, in site order.

    `scalings(method, site, stats)` gives the input/output weighting of the site's method.
    """
    results = {}
    for site in tqdm(sites, desc="decompose", unit="site", disable=not progress, leave=False):
        W = weight_matrix(model, site)
        left, right = scalings(site_methods[site.weight], site, stats)
        results[site.weight] = (W, factorize.weighted_svd(W, left, right))
    return results
