"""XTBEnergy: values and gradients against tblite itself, autograd path, validity, hooks, pickling.

Units: tblite takes Bohr and returns Hartree and Hartree/Bohr; the reward is in kcal/mol and kcal/mol/Å.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from tblite.interface import Calculator

from rewards.base import Reward
from rewards.molecule import (
    ALANINE_DIPEPTIDE,
    XTBEnergy,
    molecular_graph,
    sample_conformers,
    xtb_backend,
)

HARTREE = 627.509474  # kcal/mol
BOHR = 0.529177210903  # Å
E_REF = -21940.0  # an explicit reference (kcal/mol), near alanine dipeptide's GFN1 minimum


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.as_tensor(sample_conformers(6, 0), dtype=torch.float64)


@pytest.fixture(scope="module")
def reward() -> XTBEnergy:
    return XTBEnergy(reference=E_REF, cache_dir=None)


def tblite_direct(structure: np.ndarray, method: str = "GFN1-xTB") -> tuple[float, np.ndarray]:
    numbers = molecular_graph(ALANINE_DIPEPTIDE).numbers
    calc = Calculator(method, numbers, structure.reshape(-1, 3) / BOHR, logger=lambda _: None)
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    return float(res.get("energy")), np.asarray(res.get("gradient"))


def test_rewards_and_gradients_equal_tblite_with_unit_conversions(reward, x):
    batch, grad = reward.evaluate_with_grad(x)
    assert batch.valid.all() and batch.errors is None
    assert grad.shape == x.shape and grad.dtype == x.dtype
    for k in range(2):
        e_ha, g_ha_bohr = tblite_direct(x[k].numpy())
        assert batch.rewards[k].item() == pytest.approx(-(e_ha * HARTREE - E_REF), abs=1e-8)
        np.testing.assert_allclose(grad[k].numpy(), -(g_ha_bohr * HARTREE / BOHR).reshape(-1), atol=1e-9)


def test_gradient_matches_central_finite_differences(reward, x):
    """Step 1e-4 Å: the truncation error (~h^2 E''' ~ 1e-7) is negligible; the SCF energy is variational,
    so its convergence error is second order in the density residual (observed |fd - analytic| up to
    ~3e-3 kcal/mol/Å). Components are O(1-80) kcal/mol/Å, so atol 0.02 plus 0.1 % is a strict check
    that still catches any unit slip (a Bohr/Å mix-up is a factor 1.9)."""
    h = 1e-4
    _, grad = reward.evaluate_with_grad(x[:1])
    coords = [0, 13, 40]  # x of atom 0, y of atom 4 (alpha carbon), y of atom 13 (a hydrogen)
    shifted = x[:1].repeat(2 * len(coords), 1).clone()
    for k, c in enumerate(coords):
        shifted[2 * k, c] += h
        shifted[2 * k + 1, c] -= h
    r = reward.evaluate(shifted).rewards.numpy()
    fd = (r[0::2] - r[1::2]) / (2 * h)
    np.testing.assert_allclose(fd, grad[0, coords].numpy(), rtol=1e-3, atol=0.02)


def test_autograd_sees_the_analytic_gradient(reward, x):
    xg = x.clone().requires_grad_(True)
    out = reward.evaluate(xg)
    (auto,) = torch.autograd.grad(out.rewards.sum(), xg)
    _, analytic = reward.evaluate_with_grad(x)
    torch.testing.assert_close(auto, analytic)
    # the base class's autograd route through evaluate() agrees as well
    _, via_base = Reward.evaluate_with_grad(reward, x)
    torch.testing.assert_close(via_base, analytic)
    assert not reward.evaluate(x).rewards.requires_grad


def test_invalid_samples_are_flagged_and_do_not_stop_the_batch(reward, x):
    g = molecular_graph(ALANINE_DIPEPTIDE)
    bad = x[:4].clone().reshape(4, 22, 3)
    i, j = g.bonds[3]
    bad[0, j] = bad[0, i] + 3.0 * (bad[0, j] - bad[0, i]) / (bad[0, j] - bad[0, i]).norm()  # bond at 3 Å
    bad[1, 7, 2] = float("nan")
    batch, grad = reward.evaluate_with_grad(bad.reshape(4, -1))
    assert batch.valid.tolist() == [False, False, True, True]
    assert batch.errors == ["topology", "malformed", "", ""]
    assert torch.isnan(batch.rewards[:2]).all() and torch.isfinite(batch.rewards[2:]).all()
    assert (grad[:2] == 0).all() and (grad[2:] != 0).any()
    clean = reward.evaluate(x[2:4]).rewards
    torch.testing.assert_close(batch.rewards[2:], clean)
    wrong = reward.evaluate(torch.zeros(3, 65, dtype=torch.float64))
    assert wrong.errors == ["malformed"] * 3 and not wrong.valid.any()


def test_scf_failures_are_per_sample(x):
    unconverged = XTBEnergy(reference=E_REF, cache_dir=None, max_iterations=2).evaluate(x[:2])
    assert unconverged.errors == ["unconverged", "unconverged"] and not unconverged.valid.any()
    # tblite raising for one structure (a water molecule's atoms all at one point) spares the others
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    points = xtb_backend.single_points(np.array([8, 1, 1]), np.stack([np.zeros((3, 3)), water]),
                                       xtb_backend.XTBSettings())
    assert points.errors == ["exception", ""] and np.isnan(points.energy[0]) and np.isfinite(points.energy[1])
    assert not points.gradient[0].any() and np.isfinite(points.gradient[1]).all()


def test_auto_reference_is_the_minimum_over_conformers_and_cached(tmp_path, x):
    auto = XTBEnergy(reference_samples=4, reference_seed=0, cache_dir=str(tmp_path))
    rewards = auto.evaluate(x[:4]).rewards  # x[:4] are the same 4 conformers (seed 0)
    assert rewards.max().item() == pytest.approx(0.0, abs=1e-9) and (rewards <= 1e-9).all()
    (cached,) = tmp_path.glob("xtb-reference-*.json")
    assert json.loads(cached.read_text())["energy_kcal_mol"] == pytest.approx(auto.reference_energy())
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind

    # the next reward reads the file instead of computing the reference again: it returns what the file says
    record = json.loads(cached.read_text())
    cached.write_text(json.dumps({**record, "energy_kcal_mol": record["energy_kcal_mol"] + 1.5}))
    again = XTBEnergy(reference_samples=4, reference_seed=0, cache_dir=str(tmp_path))
    assert again.reference_energy() == auto.reference_energy() + 1.5


def test_explicit_reference_and_argument_checks(reward, x):
    other = XTBEnergy(reference=E_REF + 10.0, cache_dir=None)
    torch.testing.assert_close(other.evaluate(x[:2]).rewards, reward.evaluate(x[:2]).rewards + 10.0)
    with pytest.raises(ValueError, match="method"):
        XTBEnergy(method="GFN0-xTB")
    with pytest.raises(ValueError, match="reference"):
        XTBEnergy(reference="lowest")
    with pytest.raises(ValueError, match="C1CC"):
        XTBEnergy(smiles="C1CC")


def test_picklable_and_hooks(reward, x, tmp_path):
    clone = pickle.loads(pickle.dumps(reward))
    torch.testing.assert_close(clone.evaluate(x[:2]).rewards, reward.evaluate(x[:2]).rewards)
    assert clone.value_kwargs()["tblite"] == xtb_backend.tblite_version()
    data = x.numpy()
    stats = reward.describe(data, np.ones(len(data), dtype=bool))
    assert set(stats) == {"diversity_rmsd", "topology_valid"}
    assert stats["diversity_rmsd"] > 0.3 and stats["topology_valid"] == 1.0
    broken = data.copy()
    broken[0, :3] += 50.0  # one atom far away: bonds missing
    assert reward.describe(broken, np.ones(len(data), dtype=bool))["topology_valid"] == pytest.approx(5 / 6)
    valid = np.ones(len(data), dtype=bool)
    (path,) = reward.figures(tmp_path, data, valid, data[:3], valid[:3])
    assert path.name == "ramachandran.png" and path.stat().st_size > 1000


def test_small_molecule_end_to_end(tmp_path):
    smiles = "CCO"
    data = sample_conformers(5, 2, smiles=smiles)
    ethanol = XTBEnergy(smiles=smiles, reference_samples=3, cache_dir=str(tmp_path))
    xs = torch.as_tensor(data, dtype=torch.float64)
    batch, grad = ethanol.evaluate_with_grad(xs)
    assert batch.valid.all() and grad.shape == (5, 27)
    assert (batch.rewards < 5.0).all()  # within a few kcal/mol of the best of 3 conformers
    assert ethanol.figures(tmp_path, data, np.ones(5, bool), data, np.ones(5, bool)) == []
    assert set(ethanol.describe(data, np.ones(5, bool))) == {"diversity_rmsd", "topology_valid"}


def test_openmp_thread_limit_is_applied_and_restored():
    lib = xtb_backend._openmp_runtime()
    if lib is None:
        pytest.skip("tblite built without OpenMP")
    before = lib.omp_get_max_threads()
    with xtb_backend.openmp_threads(1):
        assert lib.omp_get_max_threads() == 1
    assert lib.omp_get_max_threads() == before


def test_displacement_form_gives_the_same_rewards_and_chain_ruled_gradients(reward, x):
    """sample_conformers(scale=s) and XTBEnergy(scale=s): z = (x - x_ref) / s, r(z) = r(x),
    dr/dz = s dr/dx (checked against the Å form and a finite difference in z)."""
    from rewards.molecule import reference_structure

    s = 0.3
    z_data = sample_conformers(3, 0, scale=s)
    np.testing.assert_allclose(
        z_data * s + reference_structure(ALANINE_DIPEPTIDE).reshape(-1), x[:3].numpy(), atol=1e-5
    )
    scaled = XTBEnergy(reference=E_REF, cache_dir=None, scale=s)
    z = (x[:2] - torch.tensor(reference_structure(ALANINE_DIPEPTIDE).reshape(-1))) / s
    out_z, grad_z = scaled.evaluate_with_grad(z)
    out_x, grad_x = reward.evaluate_with_grad(x[:2])
    np.testing.assert_allclose(out_z.rewards.numpy(), out_x.rewards.numpy(), atol=1e-8)
    np.testing.assert_allclose(grad_z.numpy(), s * grad_x.numpy(), atol=1e-8)
    h, c = 1e-4, 13
    pair = z[:1].repeat(2, 1).clone()
    pair[0, c] += h
    pair[1, c] -= h
    r = scaled.evaluate(pair).rewards.numpy()
    assert (r[0] - r[1]) / (2 * h) == pytest.approx(float(grad_z[0, c]), rel=1e-3, abs=0.02)
    assert scaled.describe(z.numpy(), np.ones(2, bool))["topology_valid"] == 1.0
    with pytest.raises(ValueError, match="scale"):
        XTBEnergy(scale=0.0)


def test_an_energy_far_below_the_reference_is_implausible():
    """GFN1-xTB's SCF can land in a spurious state on collapsed structures, hundreds to thousands of kcal/mol
    below every conformer (the module docstring's ethanol); the check is on E - E_ref, shown here with an explicit
    reference placed above real conformers."""
    x = torch.as_tensor(sample_conformers(3, 0, smiles="CCO"), dtype=torch.float64)
    unchecked = XTBEnergy(smiles="CCO", reference=0.0, cache_dir=None, max_below_reference=float("inf"))
    energies = -unchecked.evaluate(x).rewards.numpy()
    low = float(energies.min())
    near = XTBEnergy(smiles="CCO", reference=low + 10.0, cache_dir=None).evaluate(x)
    assert near.valid.all()  # 10 kcal/mol below the reference: plausible
    middle = float(np.sort(energies)[1:].mean())  # between the second and the third conformer's energy
    far = XTBEnergy(smiles="CCO", reference=middle + 50.0, cache_dir=None).evaluate(x)
    plausible = energies > middle  # at most 50 kcal/mol below the reference
    assert far.valid.numpy().tolist() == plausible.tolist() and plausible.sum() == 1
    assert [e for e, ok in zip(far.errors, plausible) if not ok] == ["implausible"] * 2
    assert torch.isnan(far.rewards[~far.valid]).all()
    off = XTBEnergy(smiles="CCO", reference=low + 100.0, cache_dir=None, max_below_reference=float("inf"))
    assert off.evaluate(x).valid.all() and off.value_kwargs()["max_below_reference"] == float("inf")
    with pytest.raises(ValueError, match="max_below_reference"):
        XTBEnergy(smiles="CCO", max_below_reference=0.0)


def test_relaxed_reward_scores_the_mmff_relaxed_structure(x):
    """``relax_steps``: the reward is tblite's energy of the MMFF94-relaxed structure, which keeps the sample's
    bonds and its Ramachandran region; it has no gradient, and the setting enters the cache key."""
    from rewards.molecule.mmff import MMFFEnergy
    from rewards.molecule.ramachandran import phi_psi_angles
    from rewards.molecule.relax import relax
    from rewards.molecule.topology import bonded_topology_ok

    noisy = x[:3].numpy() + 0.03 * np.random.default_rng(0).standard_normal(x[:3].shape)
    relaxed = relax(noisy.reshape(3, -1, 3), ALANINE_DIPEPTIDE, 200).reshape(3, -1)
    mmff = MMFFEnergy(ALANINE_DIPEPTIDE)
    before = mmff.evaluate(torch.as_tensor(noisy)).rewards.numpy()
    after = mmff.evaluate(torch.as_tensor(relaxed)).rewards.numpy()
    assert np.all(after > before + 10.0)  # minus the MMFF energy: at least 10 kcal/mol of strain removed
    assert bonded_topology_ok(relaxed, ALANINE_DIPEPTIDE).all()
    turn = phi_psi_angles(relaxed, ALANINE_DIPEPTIDE) - phi_psi_angles(noisy, ALANINE_DIPEPTIDE)
    assert np.abs((turn + 180.0) % 360.0 - 180.0).max() < 90.0  # to the nearest minimum: measured 22-55 degrees
    reward = XTBEnergy(reference=E_REF, cache_dir=None, relax_steps=200)
    assert not reward.differentiable and reward.value_kwargs()["relax_steps"] == 200
    assert "relax_steps" not in XTBEnergy(reference=E_REF, cache_dir=None).value_kwargs()
    batch = reward.evaluate(torch.as_tensor(noisy))
    for k in range(3):
        e_ha, _ = tblite_direct(relaxed[k])
        assert batch.rewards[k].item() == pytest.approx(-(e_ha * HARTREE - E_REF), abs=1e-6)
    with pytest.raises(TypeError, match="no gradients"):
        reward.evaluate_with_grad(torch.as_tensor(noisy))
    with pytest.raises(ValueError, match="relax_steps"):
        XTBEnergy(reference=E_REF, cache_dir=None, relax_steps=-1)
