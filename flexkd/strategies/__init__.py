"""Importing this package registers every strategy."""

from flexkd.strategies import features, flexkd, logits  # noqa: F401  (registration)
from flexkd.strategies.base import STRATEGIES, SetupContext, Strategy, build_strategy

__all__ = ["STRATEGIES", "SetupContext", "Strategy", "build_strategy"]
