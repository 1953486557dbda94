"""The model state an attack runs in: eval mode (BatchNorm statistics frozen, dropout off), restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP: attack forwards need no gradient synchronisation across ranks."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def attack_mode(model: torch.nn.Module, update_bn: bool = False) -> Iterator[torch.nn.Module]:
    """Yield the (unwrapped) model to attack.

    ``update_bn=False``: every submodule is put in eval mode, so BatchNorm uses and keeps its running
    statistics. ``update_bn=True``: modes are left as they are (a model in train mode then updates its
    BatchNorm statistics with every attack forward). Each submodule's own mode is restored on exit, also
    when the attack raises.
    """
    net = unwrap(model)
    modes = [(m, m.training) for m in net.modules()]
    try:
        if not update_bn:
            net.eval()
        yield net
    finally:
        for m, training in modes:
            m.training = training
