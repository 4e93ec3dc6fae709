"""A velocity with a learnt restoring force: an MLP plus a time-dependent step along a harmonic pair potential.

Why (README "Molecules"): a generated molecule's energy is decided mostly by how exactly its bond lengths and
angles sit, and those are set by the sampler's last steps. A plain MLP on coordinates cannot learn, from a few
thousand structures, to move every structure along its own restoring force; this module gives it that direction
as an input it only has to scale.

Sample space (as ``rewards.molecule``): z (n, d), d = 3 N, displacements from a reference structure in units of
``scale`` (x = x_ref + scale z, x the Å positions (n, N, 3) flattened). For P atom pairs p = (i, j) with rest
lengths d0_p (Å), kinds k_p (bond, angle, ...) and weights w_p, the potential in units of scale² is

    E(z) = 1/2 sum_p w_p e_p²,   e_p = (|x_i - x_j| - d0_p) / scale,

and its negative gradient in sample space, per kind k, is

    F_k(z)_i = - sum_{p of kind k, p = (i, j)} w_p e_p u_p  (+ the same with the opposite sign at atom j),

u_p = (x_i - x_j) / |x_i - x_j|. The velocity is

    v(z, t) = mlp(z, t) + sum_k c_k(t) F_k(z),   c_k(t) = beta_k(t) / (lambda_max (1 - t + floor)),

beta_k(t) = sigmoid(a_k(phi(t))) in (0, 1), a_k a linear map of the MLP's Fourier time features phi, and
lambda_max the largest eigenvalue of the pairs' weighted graph Laplacian (an upper bound on the Hessian of E).
F / lambda_max is a gradient step on E that cannot overshoot its stiffest mode, and 1 / (1 - t) is how a
flow-matching velocity scales near the data (v = (E[x1 | x_t] - x_t) / (1 - t)): the correction can remove
a whole residual strain by t = 1, as the last steps' noise demands. Stability: an Euler step h of the SDE (whose
drift carries at most 2 v) moves the stiffest mode by 2 h beta / (1 - t + floor) < 2 of its strain whenever
h <= 1 - t + floor, which holds at every grid point; so any step count is stable. ``floor`` caps the rate
at t = 1 (default 0.02).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tfft.model import VelocityMLP, _expand_time

__all__ = ["pair_geometry", "pair_forces", "laplacian_bound", "RestoringVelocity"]


def pair_geometry(z: Tensor, reference: Tensor, pairs: Tensor, rest: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The pairs' errors e (n, P) = (|x_i - x_j| - d0) / scale and unit vectors u (n, P, 3) from j to i, for
    z (n, 3N), x = x_ref + scale z (Å), reference (3N,), pairs (P, 2), rest (P,) Å."""
    x = (reference + scale * z).view(z.shape[0], -1, 3)
    delta = x[:, pairs[:, 0]] - x[:, pairs[:, 1]]  # (n, P, 3)
    length = delta.norm(dim=-1).clamp_min(1e-6)
    return (length - rest) / scale, delta / length[..., None]


def pair_forces(z: Tensor, reference: Tensor, pairs: Tensor, rest: Tensor, weights: Tensor, kinds: Tensor,
                n_kinds: int, scale: float) -> Tensor:
    """F_k(z) for every kind: z (n, 3N), reference (3N,), pairs (P, 2) long, rest (P,) Å, weights (P,),
    kinds (P,) long in [0, n_kinds) -> (n_kinds, n, 3N) (module docstring)."""
    n = z.shape[0]
    atoms = reference.numel() // 3
    errors, unit = pair_geometry(z, reference, pairs, rest, scale)
    push = (weights * errors)[..., None] * unit  # w e u: (n, P, 3)
    # each pair pushes its two atoms in the rows of its kind: slot k * atoms + atom of an (n, K * atoms, 3) buffer
    forces = z.new_zeros(n, n_kinds * atoms, 3)
    forces = forces.index_add(1, kinds * atoms + pairs[:, 0], -push).index_add(1, kinds * atoms + pairs[:, 1], push)
    return forces.view(n, n_kinds, 3 * atoms).transpose(0, 1)


def laplacian_bound(pairs: Tensor, weights: Tensor, atoms: int) -> float:
    """The largest eigenvalue of the weighted graph Laplacian of ``pairs`` on ``atoms`` nodes (>= the Hessian
    of E in sample space at rest, since u u^T <= I)."""
    lap = torch.zeros(atoms, atoms, dtype=torch.float64)
    i, j = pairs[:, 0], pairs[:, 1]
    w = weights.to(torch.float64)
    lap.index_put_((i, j), -w, accumulate=True)
    lap.index_put_((j, i), -w, accumulate=True)
    lap.index_put_((i, i), w, accumulate=True)
    lap.index_put_((j, j), w, accumulate=True)
    return float(torch.linalg.eigvalsh(lap).max())


class RestoringVelocity(nn.Module):
    """v(z, t) = VelocityMLP(z, t) + sum_k c_k(t) F_k(z) (module docstring); a flat velocity (n, 3N) -> (n, 3N).

    Args:
        reference: (3N,) the reference structure x_ref, Å.
        pairs: (P, 2) atom index pairs; rest: (P,) their rest lengths, Å; weights: (P,) > 0.
        kinds: (P,) the kind index of each pair (0 .. K - 1), each kind with its own rate c_k(t).
        scale: Å per sample-space unit.
        hidden, depth, time_features: the MLP's settings (``tfft.model.VelocityMLP``).
        floor: the floor of 1 - t in the rate (> 0).
        initial_rate: beta_k(t) at initialisation (in (0, 1)).
    """

    def __init__(self, reference: Tensor, pairs: Tensor, rest: Tensor, weights: Tensor, kinds: Tensor, *,
                 scale: float, hidden: int = 256, depth: int = 3, time_features: int = 16, floor: float = 0.02,
                 initial_rate: float = 0.1) -> None:
        super().__init__()
        pairs = torch.as_tensor(pairs, dtype=torch.long)
        if pairs.dim() != 2 or pairs.shape[1] != 2 or not len(pairs):
            raise ValueError(f"pairs must have shape (P, 2) with P >= 1, got {tuple(pairs.shape)}")
        if not 0.0 < initial_rate < 1.0:
            raise ValueError(f"initial_rate must lie in (0, 1), got {initial_rate}")
        if floor <= 0 or scale <= 0:
            raise ValueError(f"floor and scale must be > 0, got {floor} and {scale}")
        reference = torch.as_tensor(reference, dtype=torch.float32).reshape(-1)
        self.mlp = VelocityMLP(reference.numel(), hidden, depth, time_features)
        kinds = torch.as_tensor(kinds, dtype=torch.long)
        self.n_kinds = int(kinds.max()) + 1
        self.scale = float(scale)
        for name, value in (("reference", reference), ("pairs", pairs),
                            ("rest", torch.as_tensor(rest, dtype=torch.float32)),
                            ("weights", torch.as_tensor(weights, dtype=torch.float32)), ("kinds", kinds)):
            self.register_buffer(name, value, persistent=False)
        self.floor = float(floor)
        self.step_size = 1.0 / laplacian_bound(pairs, self.weights, reference.numel() // 3)
        self.rate_head = nn.Linear(time_features, self.n_kinds)
        nn.init.zeros_(self.rate_head.weight)
        nn.init.constant_(self.rate_head.bias, float(torch.logit(torch.tensor(initial_rate))))

    def fractions(self, t: Tensor) -> Tensor:
        """beta_k(t) / (1 - t + floor): t (n,) -> (n, K), the rates before the force's step size."""
        beta = torch.sigmoid(self.rate_head(self.mlp.time_embedding(t)))
        return beta / (1.0 - t + self.floor)[:, None]

    def rates(self, t: Tensor) -> Tensor:
        """c_k(t) = step_size beta_k(t) / (1 - t + floor): t (n,) -> (n, K)."""
        return self.step_size * self.fractions(t)

    def forward(self, z: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """z (n, 3N), t scalar or (n,) -> (n, 3N)."""
        t = _expand_time(t, z)
        return self.mlp(z, t, cond) + self.correction(z, t)

    def correction(self, z: Tensor, t: Tensor) -> Tensor:
        """sum_k c_k(t) F_k(z): z (n, 3N), t (n,) -> (n, 3N)."""
        forces = pair_forces(z, self.reference.to(z.dtype), self.pairs, self.rest.to(z.dtype),
                             self.weights.to(z.dtype), self.kinds, self.n_kinds, self.scale)
        return torch.einsum("nk,knd->nd", self.rates(t).to(z.dtype), forces)
