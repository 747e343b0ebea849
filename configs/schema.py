"""Typed schemas of the Hydra config tree: how they are found and registered.

Each package keeps the dataclass schemas of the config groups and entry points it serves in its own
`<package>/config.py` (data/config.py, sim/config.py, ...), next to the code that reads them, with
a `register(cs)` function; `register()` here collects them all into Hydra's ConfigStore. The yaml
files under `configs/` only choose values; derived values are computed in code, never with
interpolation resolvers.
"""

from __future__ import annotations

import importlib

PACKAGES = ("data", "values", "policies", "policies.qsft", "sim", "real_robot")


def register() -> None:
    """Register every package's schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for package in PACKAGES:
        try:
            module = importlib.import_module(f"{package}.config")
        except ModuleNotFoundError as err:
            if err.name == f"{package}.config":
                continue  # this package has no config yet
            raise
        module.register(cs)
