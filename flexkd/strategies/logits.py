"""Strategies without feature terms: plain fine-tuning and logit distillation."""

from __future__ import annotations

from flexkd.strategies.base import LogitWeight, Strategy


class SFT(Strategy):
    """L_task only (gamma defaults to 0; the config may still add a logit term)."""

    name = "sft"


class LogitKD(Strategy):
    """L_task + gamma * KL(teacher || student) at temperature T, T^2-scaled."""

    name = "logit_kd"

    class Knobs(Strategy.Knobs):
        gamma: LogitWeight = 1.0
