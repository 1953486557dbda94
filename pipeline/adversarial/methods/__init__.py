"""Adversarial training methods, one file each (the method class and its config class), found automatically.

Every module of this package is imported here, and each :class:`Method` subclass with a ``config_class``
registers itself in :data:`METHODS` when it is defined; ``pipeline.config`` builds the ``method:`` section of
the config from that registry. A new method is a new file in this package and nothing else. The class names
imported below are a convenience for callers; a new method needs no entry.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.adversarial.methods.base import METHODS, BaseMethodConfig, Method, MethodOutput
from pipeline.adversarial.tasks import Task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from pipeline.adversarial.methods.dpaat import DPAAT  # noqa: E402  (already imported by the loop above)
from pipeline.adversarial.methods.ima import IMA  # noqa: E402
from pipeline.adversarial.methods.mart import MART  # noqa: E402
from pipeline.adversarial.methods.pgd_at import PGDAT  # noqa: E402
from pipeline.adversarial.methods.standard import Standard  # noqa: E402
from pipeline.adversarial.methods.trades import TRADES  # noqa: E402


def build_method(cfg: BaseMethodConfig, task: Task, n_train: int,
                 clamp: tuple[float, float] | None = None) -> Method:
    """The method named by ``cfg.name``, built by its :meth:`Method.from_config` (per-sample state included).

    ``clamp``: the valid intensity range the attacks clamp to (``data.intensity_range``), None for none.
    """
    return METHODS[cfg.name].from_config(cfg, task, n_train, clamp)


__all__ = ["METHODS", "BaseMethodConfig", "Method", "MethodOutput", "build_method", "DPAAT", "IMA",
           "MART", "PGDAT", "Standard", "TRADES"]
