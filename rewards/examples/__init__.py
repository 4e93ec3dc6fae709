"""Shipped example rewards: real computations run as external simulators.

- :mod:`rewards.examples.epidemic`: a stochastic metapopulation SEIR epidemic with a lockdown, run as
  ``python -m rewards.examples.epidemic IN.npy OUT.npy`` through :class:`rewards.simulator.Command`.

Submodules are not imported here, so that a simulator process pays only for what it uses.
"""

__all__: list[str] = []
