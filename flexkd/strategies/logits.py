"""Strategies without feature terms: plain fine-tuning and logit distillation."""

from __future__ import annotations

from flexkd.strategies.base import Strategy, register


@register("sft")
class SFT(Strategy):
    """L_task only (gamma defaults to 0; the config may still add a logit term)."""


@register("logit_kd")
class LogitKD(Strategy):
    """L_task + gamma * KL(teacher || student) at temperature T, T^2-scaled."""

    def __init__(self, gamma: float = 1.0, **kwargs):
        super().__init__(gamma=gamma, **kwargs)
