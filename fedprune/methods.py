"""The method registry: every method by name, with where its strategy, its client routines and its
experiment file live.

A method is a strategy class (server side, in ``strategies/``), optionally client routines (a dict
in a ``client_app/`` module mapping a phase, ``train``, ``evaluate`` or a query phase name, to a
routine; phases it does not name use the app's default routines) and a config in ``configs/``.
The apps look methods up here by name and import what they need lazily, so this module imports
neither app. docs/adding-a-method.md walks through adding one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    strategy: str
    """``"module:Class"`` of the strategy; the class is built with the experiment."""
    config: str
    """The method's default experiment file."""
    client: str | None = None
    """``"module:NAME"`` of the method's client routines (a dict phase -> routine), or None."""
    masked: bool = True
    """Whether the method trains under a weight mask (``pruning.density`` applies)."""

    def strategy_class(self) -> type:
        module, _, cls = self.strategy.partition(":")
        return getattr(importlib.import_module(module), cls)

    def routines(self) -> dict:
        if self.client is None:
            return {}
        module, _, name = self.client.partition(":")
        return dict(getattr(importlib.import_module(module), name))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fedavg", "strategies.base:FedPruneStrategy", "configs/fedavg.yaml", masked=False),
    Method("random", "strategies.baselines:RandomMask", "configs/random.yaml"),
    Method("magnitude", "strategies.baselines:MagnitudeMask", "configs/magnitude.yaml"),
    Method("snip", "strategies.baselines:SnipMask", "configs/snip.yaml", client="client_app.baselines:SNIP"),
    Method("synflow", "strategies.baselines:SynFlowMask", "configs/synflow.yaml"),
    Method("gradual-magnitude", "strategies.baselines:GradualMagnitude", "configs/gradual-magnitude.yaml"),
    Method("fedlp-homo", "strategies.fedlp:FedLPHomo", "configs/fedlp-homo.yaml", client="client_app.fedlp:HOMO",
           masked=False),
    Method("fedlp-hetero", "strategies.fedlp:FedLPHetero", "configs/fedlp-hetero.yaml",
           client="client_app.fedlp:HETERO", masked=False),
    Method("feddp", "strategies.feddp:FedDP", "configs/feddp.yaml", client="client_app.feddp:FEDDP", masked=False),
    Method("fedtiny", "strategies.fedtiny:FedTiny", "configs/fedtiny.yaml", client="client_app.fedtiny:FEDTINY"),
    Method("autoflip", "strategies.autoflip:AutoFlip", "configs/autoflip.yaml", client="client_app.autoflip:AUTOFLIP",
           masked=False),
    Method("ntk-zo", "strategies.ntk_zo:NtkZo", "configs/ntk-zo.yaml", client="client_app.ntk_zo:NTK_ZO"),
    Method("zo-dense", "strategies.ntk_zo:ZeroOrder", "configs/zo-dense.yaml", client="client_app.ntk_zo:ZO",
           masked=False),
)}


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises ValueError listing the registered ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: got {name!r}; registered: {', '.join(METHODS)}") from None
