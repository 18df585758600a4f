"""Target descriptions: one TOML file per backend, loaded into a frozen `TargetSpec`."""

from qcompiler.targets.spec import TargetSpec, list_targets, load_target

__all__ = ["TargetSpec", "list_targets", "load_target"]
