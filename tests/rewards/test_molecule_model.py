"""rewards.molecule.model: the restoring pairs of a molecule's graph, rest lengths at the MMFF94 minimum, and the
factory through the user-model contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.molecule.conformers import reference_structure
from rewards.molecule.model import conformer_velocity, restoring_pairs
from rewards.molecule.relax import relax
from tfft.projection import ProjectingVelocity, gauss_newton_step, pair_jacobian
from tfft.restoring import pair_forces

ETHANOL = "CCO"  # C0 C1 O2 and six hydrogens: 8 bonds


def test_ethanol_has_its_eight_bonds_and_every_angle_pair_once() -> None:
    pairs, kinds = restoring_pairs(ETHANOL)
    bonds = pairs[kinds == 0]
    angles = pairs[kinds == 1]
    assert len(bonds) == 8
    # angle pairs: sum over atoms of C(degree, 2): C0 has 4 neighbours (6), C1 has 4 (6), O has 2 (1)
    assert len(angles) == 13
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    bonded = {tuple(p) for p in bonds.tolist()}
    assert (0, 1) in bonded and (1, 2) in bonded and (0, 2) not in bonded
    assert (0, 2) in {tuple(p) for p in angles.tolist()}  # C-C-O


def test_the_factorys_force_vanishes_at_the_mmff_minimum_and_restores_a_stretched_bond() -> None:
    scale = 0.3
    model = conformer_velocity(ETHANOL, scale, hidden=16, depth=1, correction="force")
    reference = reference_structure(ETHANOL)
    minimum = relax(reference[None].astype(np.float64), ETHANOL, 2000)[0]
    z = torch.tensor(((minimum - reference).reshape(1, -1)) / scale, dtype=torch.float32)
    args = (model.reference, model.pairs, model.rest, model.weights, model.kinds, model.n_kinds, scale)
    assert float(pair_forces(z, *args).abs().max()) < 1e-3
    stretched = minimum.copy()
    stretched[2] += 0.1 * (minimum[2] - minimum[1]) / np.linalg.norm(minimum[2] - minimum[1])  # C-O by 10%
    z = torch.tensor(((stretched - reference).reshape(1, -1)) / scale, dtype=torch.float32)
    bond_force = pair_forces(z, *args)[0].view(-1, 3)[2].numpy()
    towards_carbon = (minimum[1] - minimum[2]) / np.linalg.norm(minimum[1] - minimum[2])
    assert float(bond_force @ towards_carbon) > 0.9 * np.linalg.norm(bond_force) > 0
    out = model(torch.zeros(3, 27), torch.rand(3))
    assert out.shape == (3, 27)


def test_the_default_projection_vanishes_at_the_mmff_minimum_and_a_full_step_restores_a_stretched_bond() -> None:
    """The default model (correction='projection'): zero at the rest lengths; from C-O stretched by 10%, the full
    Gauss-Newton step (fraction 1) brings every pair back to its rest length to second order (the residual is a
    small fraction of the 0.14 Å stretch)."""
    scale = 0.3
    model = conformer_velocity(ETHANOL, scale, hidden=16, depth=1)
    assert isinstance(model, ProjectingVelocity)
    reference = reference_structure(ETHANOL)
    minimum = relax(reference[None].astype(np.float64), ETHANOL, 2000)[0]
    stretched = minimum.copy()
    stretched[2] += 0.1 * (minimum[2] - minimum[1]) / np.linalg.norm(minimum[2] - minimum[1])
    args = (model.reference.double(), model.pairs, model.rest.double(), scale)
    for structure, largest_error in ((minimum, 1e-3), (stretched, 0.02)):
        z = torch.tensor(((structure - reference).reshape(1, -1)) / scale, dtype=torch.float64)
        errors, jac = pair_jacobian(z, *args)
        z = z + gauss_newton_step(errors, jac, torch.ones_like(errors), model.damping)
        assert float(pair_jacobian(z, *args)[0].abs().max()) * scale < largest_error
    with pytest.raises(ValueError, match="model.kwargs.correction"):
        conformer_velocity(ETHANOL, scale, correction="spring")


def test_a_molecule_without_mmff_parameters_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="MMFF94 has no parameters for 'OB\\(O\\)O'.*plain MLP"):
        conformer_velocity("OB(O)O", 0.3)


def test_a_relaxed_xtb_reward_on_such_a_molecule_names_its_setting() -> None:
    from rewards.molecule import XTBEnergy

    with pytest.raises(ValueError, match="'reward.kwargs.relax_steps' needs MMFF94 parameters, which 'OB\\(O\\)O'"):
        XTBEnergy(smiles="OB(O)O", relax_steps=10)
    assert XTBEnergy(smiles="OB(O)O").relax_steps == 0  # unrelaxed, MMFF94 is not needed
