"""A velocity that projects onto the rest lengths: an MLP plus a learnt fraction of a Gauss-Newton step.

Why: :class:`tfft.restoring.RestoringVelocity` moves along the gradient of a harmonic pair potential, one step
size for every pair, bounded by the stiffest mode (1 / lambda_max), so softer modes relax more slowly than the
data demand and pretraining drives the rate to its bound (README "Molecules"). A Gauss-Newton step treats every
pair alike.

Sample space and pairs as in :mod:`tfft.restoring`: z (n, 3N), x = x_ref + scale z (Å), pairs p = (i, j) with rest
lengths d0_p and kinds k_p. The pair errors e_p = (|x_i - x_j| - d0_p) / scale have the Jacobian J (n, P, 3N),
row p = u_p at atom i and -u_p at atom j, u_p the unit vector from j to i. The step that removes the fraction
f_p of every error to first order, with the least displacement, is

    delta(z) = -J^T (J J^T + mu I)^-1 (f * e),    J delta = -f * e  (mu -> 0, J of full row rank),

mu a small damping (J J^T has diagonal 2; redundant pairs, four about one sp3 centre, make it singular). J is
formed densely: a sparse J J^T (from the pairs that share an atom) was tried and was no faster, the Cholesky
factorisation dominating. The velocity is

    v(z, t) = mlp(z, t) + delta(z; f = beta_{k_p}(t)) / (1 - t + floor),   beta_k(t) = sigmoid(a_k(phi(t))),

the rates as in :class:`~tfft.restoring.RestoringVelocity`. Near the data a flow-matching velocity is
(E[x1 | x_t] - x_t) / (1 - t): at beta = 1 the correction removes each pair's remaining error over the remaining
time. Stability: an Euler step h of the SDE (drift at most 2 v) removes at most the fraction
2 h beta / (1 - t + floor) < 2 of each error whenever h <= 1 - t + floor, at every grid point, for every mode
alike; the damping only lowers it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tfft.restoring import RestoringVelocity, pair_geometry

__all__ = ["pair_jacobian", "gauss_newton_step", "ProjectingVelocity"]


def pair_jacobian(z: Tensor, reference: Tensor, pairs: Tensor, rest: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Pair errors and their Jacobian: z (n, 3N), reference (3N,) Å, pairs (P, 2), rest (P,) Å ->
    e (n, P) = (|x_i - x_j| - d0) / scale and J (n, P, 3N) = d e / d z (module docstring)."""
    n, dim = z.shape
    errors, unit = pair_geometry(z, reference, pairs, rest, scale)
    n_pairs = pairs.shape[0]
    rows = torch.arange(n_pairs, device=z.device)
    jac = z.new_zeros(n, n_pairs, dim // 3, 3)
    jac[:, rows, pairs[:, 0]] = unit
    jac[:, rows, pairs[:, 1]] = -unit
    return errors, jac.view(n, n_pairs, dim)


def gauss_newton_step(errors: Tensor, jac: Tensor, fraction: Tensor, damping: float = 1e-2) -> Tensor:
    """delta = -J^T (J J^T + mu I)^-1 (fraction * errors): errors (n, P), jac (n, P, D), fraction (n, P) -> (n, D).

    A row with a non-finite structure (a diverged sample) gets a NaN step instead of stopping the batch: the
    sample stays non-finite and its reward marks it invalid. No host synchronisation.
    """
    eye = torch.eye(jac.shape[1], dtype=jac.dtype, device=jac.device)
    gram = jac @ jac.transpose(1, 2) + damping * eye
    factor = torch.linalg.cholesky_ex(torch.nan_to_num(gram))
    bad = (factor.info != 0) | ~torch.isfinite(gram).flatten(1).all(dim=1)
    y = torch.cholesky_solve((fraction * errors)[..., None], torch.where(bad[:, None, None], eye, factor.L))
    y = torch.where(bad[:, None, None], torch.full_like(y, float("nan")), y)
    return -(jac.transpose(1, 2) @ y).squeeze(-1)


class ProjectingVelocity(RestoringVelocity):
    """v(z, t) = VelocityMLP(z, t) + delta(z; beta(t)) / (1 - t + floor) (module docstring).

    Args: as :class:`tfft.restoring.RestoringVelocity` (``weights`` are unused: the step treats pairs alike),
    plus ``damping`` mu (> 0).
    """

    def __init__(self, *args, damping: float = 1e-2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        self.damping = float(damping)

    def correction(self, z: Tensor, t: Tensor) -> Tensor:
        """delta(z; beta_{k_p}(t)) / (1 - t + floor): z (n, 3N), t (n,) -> (n, 3N)."""
        errors, jac = pair_jacobian(z, self.reference.to(z.dtype), self.pairs, self.rest.to(z.dtype), self.scale)
        fraction = self.fractions(t).to(z.dtype)[:, self.kinds]
        return gauss_newton_step(errors, jac, fraction, self.damping)
