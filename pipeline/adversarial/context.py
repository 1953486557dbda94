"""The network an attack sees: every attack forward uses one BatchNorm rule and never moves running statistics.

Two rules (``bn``), chosen per method in the config (``method.attack_bn``):

* ``"running"``: eval mode; BatchNorm normalises with its running statistics (the usual evaluation network).
* ``"batch"``: BatchNorm normalises with the statistics of the *clean training batch*, recorded during the
  method's training forward by :class:`BatchStatistics` and frozen for the attack. At the clean input the attack
  then sees exactly the output the training forward produced, so "handled correctly" means the same thing for
  the flags, the attack and the bisection; each sample's output depends on that sample alone, so samples may
  leave the batch (early stopping, bisection of a subset) without changing the others' outputs.

The authors' IMA code attacks in train mode, where every attack forward normalises with the statistics of the
current adversarial batch and also moves the running statistics; ours keep them where the training forwards put
them. In both rules dropout is off during the attack and every submodule's mode and every swapped buffer are
restored on exit, also when the attack raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

BN_RULES = ("running", "batch")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP: attack forwards need no gradient synchronisation across ranks."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _batch_norms(net: torch.nn.Module) -> list[_BatchNorm]:
    return [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class BatchStatistics:
    """Records, while active, the mean and (biased) variance each BatchNorm layer normalises with in train mode.

    ``with BatchStatistics(model) as stats: pred = model(x)``; then ``attack_mode(model, "batch", stats)``.
    Only the first train-mode forward inside the block is recorded (the clean batch).
    """

    def __init__(self, model: torch.nn.Module):
        self.net = unwrap(model)
        self.stats: dict[_BatchNorm, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []

    def _record(self, module: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        if not module.training or module in self.stats:
            return
        x = inputs[0].detach().float()
        dims = [0, *range(2, x.dim())]
        # two passes (mean, then mean square deviation), not Tensor.var: over the batch and spatial axes of a
        # (B, C, H, W) activation torch.var is 4 to 15x slower on CPU, same accuracy (about 1e-7 relative)
        mean = x.mean(dims, keepdim=True)
        self.stats[module] = (mean.flatten(), (x - mean).square().mean(dims))

    def __enter__(self) -> BatchStatistics:
        self._hooks = [m.register_forward_pre_hook(self._record) for m in _batch_norms(self.net)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@contextmanager
def attack_mode(model: torch.nn.Module, bn: str = "running",
                stats: BatchStatistics | None = None) -> Iterator[torch.nn.Module]:
    """Yield the (unwrapped) model in eval mode, BatchNorm following rule ``bn`` (see the module doc)."""
    if bn not in BN_RULES:
        raise ValueError(f"bn must be one of {BN_RULES}, got {bn!r}")
    net = unwrap(model)
    if bn == "batch" and (stats is None or not stats.stats) and _batch_norms(net):
        raise ValueError("bn='batch' needs the clean batch's statistics (BatchStatistics around a train-mode forward)")
    modes = [(m, m.training) for m in net.modules()]
    swapped = []
    try:
        net.eval()
        if bn == "batch":
            for module, (mean, var) in stats.stats.items():
                swapped.append((module, module.running_mean, module.running_var))
                module.running_mean = mean.to(module.running_mean.dtype)
                module.running_var = var.to(module.running_var.dtype)
        yield net
    finally:
        for module, mean, var in swapped:
            module.running_mean, module.running_var = mean, var
        for m, training in modes:
            m.training = training
