"""Adversarial training methods, one small class each, built from the method config by name."""

from __future__ import annotations

from pipeline.adversarial.methods.base import Method, MethodOutput
from pipeline.adversarial.methods.dpaat import DPAAT
from pipeline.adversarial.methods.ima import IMA
from pipeline.adversarial.methods.mart import MART
from pipeline.adversarial.methods.pgd_at import PGDAT
from pipeline.adversarial.methods.standard import Standard
from pipeline.adversarial.methods.trades import TRADES
from pipeline.adversarial.state import SampleState
from pipeline.adversarial.tasks import Task
from pipeline.config import MethodConfig

METHODS: dict[str, type[Method]] = {"standard": Standard, "pgd_at": PGDAT, "trades": TRADES, "ima": IMA,
                                    "dpaat": DPAAT, "mart": MART}


def build_method(cfg: MethodConfig, task: Task, n_train: int,
                 clamp: tuple[float, float] | None = None) -> Method:
    """The method named by ``cfg.name``; IMA starts every radius at delta, DPAAT at ``cfg.eps``.

    ``clamp``: the valid intensity range the attacks clamp to (``data.intensity_range``), None for none.
    """
    cls = METHODS[cfg.name]
    if cls is Standard:
        return cls(task, cfg)
    state = None
    if cls is IMA:
        state = SampleState(n_train, cfg.delta)
    elif cls is DPAAT:
        state = SampleState(n_train, min(max(cfg.eps, cfg.eps_min), cfg.eps_max))
    return cls(task, cfg, state, clamp=clamp)


__all__ = ["METHODS", "Method", "MethodOutput", "build_method", "DPAAT", "IMA", "MART", "PGDAT", "Standard", "TRADES"]
