"""A velocity that projects onto the rest lengths: an MLP plus a learnt fraction of a Gauss-Newton step.

Why: :class:`tfft.restoring.RestoringVelocity` moves along the gradient of a harmonic pair potential, one step
size for every pair, bounded by the stiffest mode (1 / lambda_max). Softer modes then relax more slowly than the
data demand; pretraining pushes the rate to its bound (beta = 1 from t = 0.8 on alanine dipeptide) and still
leaves 2x the data's strain (README "Molecules"). A Gauss-Newton step treats every pair alike.

Sample space and pairs as in :mod:`tfft.restoring`: z (n, 3N), x = x_ref + scale z (Å), pairs p = (i, j) with rest
lengths d0_p and kinds k_p. The pair errors e_p = (|x_i - x_j| - d0_p) / scale have the Jacobian J (n, P, 3N),
row p = u_p at atom i and -u_p at atom j, u_p the unit vector from j to i. The step that removes the fraction
f_p of every error to first order, with the least displacement, is

    delta(z) = -J^T (J J^T + mu I)^-1 (f * e),    J delta = -f * e  (mu -> 0, J of full row rank),

mu a small damping (J J^T has diagonal 2; redundant pairs, four about one sp3 centre, make it singular). The
velocity is

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

from tfft.restoring import RestoringVelocity

__all__ = ["pair_jacobian", "gauss_newton_step", "shared_atom_pairs", "projection_step", "ProjectingVelocity"]


def pair_jacobian(z: Tensor, reference: Tensor, pairs: Tensor, rest: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Pair errors and their Jacobian: z (n, 3N), reference (3N,) Å, pairs (P, 2), rest (P,) Å ->
    e (n, P) = (|x_i - x_j| - d0) / scale and J (n, P, 3N) = d e / d z (module docstring)."""
    n, dim = z.shape
    errors, unit = _pair_geometry(z, reference, pairs, rest, scale)
    n_pairs = pairs.shape[0]
    rows = torch.arange(n_pairs, device=z.device)
    jac = z.new_zeros(n, n_pairs, dim // 3, 3)
    jac[:, rows, pairs[:, 0]] = unit
    jac[:, rows, pairs[:, 1]] = -unit
    return errors, jac.view(n, n_pairs, dim)


def _pair_geometry(z: Tensor, reference: Tensor, pairs: Tensor, rest: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """errors e (n, P) = (|x_i - x_j| - d0) / scale and unit vectors u (n, P, 3) from j to i, x = x_ref + scale z."""
    x = (reference + scale * z).view(z.shape[0], -1, 3)
    delta = x[:, pairs[:, 0]] - x[:, pairs[:, 1]]  # (n, P, 3)
    length = delta.norm(dim=-1).clamp_min(1e-6)
    return (length - rest) / scale, delta / length[..., None]


def gauss_newton_step(errors: Tensor, jac: Tensor, fraction: Tensor, damping: float = 1e-2) -> Tensor:
    """delta = -J^T (J J^T + mu I)^-1 (fraction * errors): errors (n, P), jac (n, P, D), fraction (n, P) -> (n, D)."""
    gram = jac @ jac.transpose(1, 2)
    gram = gram + damping * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram)
    y = torch.cholesky_solve((fraction * errors)[..., None], chol)
    return -(jac.transpose(1, 2) @ y).squeeze(-1)


def shared_atom_pairs(pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The non-zero off-diagonal entries of J J^T: pairs (P, 2) -> (p, q, sign), each (M,), over the ordered
    pairs p != q that share an atom a, sign = s_p(a) s_q(a) with s_p(a) = +1 where a is p's first atom, -1 where
    it is its second; then (J J^T)_pq = sign u_p . u_q, and (J J^T)_pp = 2."""
    rows: list[tuple[int, int, float]] = []
    listed = pairs.tolist()
    for p, (i, j) in enumerate(listed):
        for q, (k, m) in enumerate(listed):
            if p != q:
                for a, s_p in ((i, 1.0), (j, -1.0)):
                    for b, s_q in ((k, 1.0), (m, -1.0)):
                        if a == b:
                            rows.append((p, q, s_p * s_q))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    p_idx, q_idx, sign = zip(*rows)
    return torch.tensor(p_idx), torch.tensor(q_idx), torch.tensor(sign)


def projection_step(z: Tensor, reference: Tensor, pairs: Tensor, rest: Tensor, scale: float, fraction: Tensor,
                    shared: tuple[Tensor, Tensor, Tensor], damping: float = 1e-2) -> Tensor:
    """:func:`gauss_newton_step` of :func:`pair_jacobian` without the dense J: J J^T from the pairs' unit vectors
    (``shared`` = :func:`shared_atom_pairs`) and J^T y scattered onto the atoms. z (n, 3N), fraction (n, P) ->
    delta (n, 3N); the same numbers as the dense form (``tests/tfft/test_projection.py``) at a fraction of its
    cost (a 22-atom molecule: no (n, P, 3N) Jacobian)."""
    n, dim = z.shape
    errors, unit = _pair_geometry(z, reference, pairs, rest, scale)
    p_idx, q_idx, sign = shared
    n_pairs = pairs.shape[0]
    gram = torch.diag_embed(z.new_full((n, n_pairs), 2.0 + damping))
    gram = gram.index_put((torch.arange(n, device=z.device)[:, None], p_idx[None], q_idx[None]),
                          sign.to(z.dtype) * (unit[:, p_idx] * unit[:, q_idx]).sum(-1))
    # a row with a non-finite structure (a diverged sample) gets a NaN step instead of stopping the batch: the
    # sample stays non-finite and its reward marks it invalid; no host synchronisation
    failed = torch.linalg.cholesky_ex(torch.nan_to_num(gram))
    bad = (failed.info != 0) | ~torch.isfinite(gram).flatten(1).all(dim=1)
    chol = torch.where(bad[:, None, None], torch.eye(n_pairs, dtype=z.dtype, device=z.device), failed.L)
    y = torch.cholesky_solve((fraction * errors)[..., None], chol).squeeze(-1)
    y = torch.where(bad[:, None], torch.full_like(y, float("nan")), y)
    push = y[..., None] * unit  # J^T y: +y_p u_p at atom i, -y_p u_p at atom j
    step = z.new_zeros(n, dim // 3, 3).index_add(1, pairs[:, 1], push).index_add(1, pairs[:, 0], -push)
    return step.view(n, dim)


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
        for name, value in zip(("shared_p", "shared_q", "shared_sign"), shared_atom_pairs(self.pairs)):
            self.register_buffer(name, value, persistent=False)

    def correction(self, z: Tensor, t: Tensor) -> Tensor:
        """delta(z; beta_{k_p}(t)) / (1 - t + floor): z (n, 3N), t (n,) -> (n, 3N)."""
        beta = torch.sigmoid(self.rate_head(self.mlp.time_embedding(t))).to(z.dtype)  # (n, K)
        fraction = beta[:, self.kinds] / (1.0 - t + self.floor).to(z.dtype)[:, None]
        return projection_step(z, self.reference.to(z.dtype), self.pairs, self.rest.to(z.dtype), self.scale,
                               fraction, (self.shared_p, self.shared_q, self.shared_sign), self.damping)
