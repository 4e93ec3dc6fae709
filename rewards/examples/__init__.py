"""Shipped example rewards: real computations run as external simulators.

- :mod:`rewards.examples.epidemic`: a stochastic metapopulation SEIR epidemic with a lockdown, run as
  ``python -m rewards.examples.epidemic IN.npy OUT.npy`` through :class:`rewards.simulator.Command`.
- :mod:`rewards.examples.http_server`: a small reward server, r(x) = -||x||^2 over HTTP with optional
  fault injection, for :class:`rewards.http.Endpoint` (``python -m rewards.examples.http_server --port 8765``).

Submodules are not imported here, so that a simulator process pays only for what it uses.
"""

__all__: list[str] = []
