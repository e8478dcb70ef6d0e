"""Strategies: the interface, and how a config (`_target_` + knobs) builds one."""

from flexkd.strategies.base import (
    SetupContext,
    Strategy,
    available_strategies,
    build_strategy,
    strategy_class,
    variant_of,
)

__all__ = ["SetupContext", "Strategy", "available_strategies", "build_strategy", "strategy_class",
           "variant_of"]
