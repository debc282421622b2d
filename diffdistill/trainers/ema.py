"""Exponential moving averages of network weights, with the EDM ramp-up."""

from __future__ import annotations

import math

import torch
from torch import nn


def ema_decay(decay: float, num_averaged: int, rampup: float) -> float:
    """The decay to use for the ``num_averaged``-th update (1-based) since the average (re)started.

    EDM's ramp-up (Karras et al. 2022, ``training_loop.py``: ``ema_halflife_kimg`` capped by
    ``ema_rampup_ratio × cur_nimg``), counted in optimizer steps: the average's half-life is
    ``min(h, rampup · num_averaged)`` where ``h = ln ½ / ln decay`` is the half-life of ``decay``. Without it
    a short run's EMA is mostly its initial weights: after 600 steps at 0.999, 0.999⁶⁰⁰ = 55 % of the
    average is still the step-0 network. ``rampup = 0`` gives the plain constant ``decay``.
    """
    if rampup <= 0 or decay <= 0:
        return decay
    half_life = min(math.log(0.5) / math.log(decay), rampup * num_averaged)
    return 0.5 ** (1.0 / half_life)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``θ_ema ← decay·θ_ema + (1 − decay)·θ`` for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if e is not p:  # a LoRA student's EMA copy shares its frozen base weights
            e.lerp_(p.detach(), 1 - decay)
