"""Standard (non-adversarial) training through the method interface."""

from __future__ import annotations

from typing import Literal

from pipeline.adversarial.methods.base import BaseMethodConfig, Method, MethodOutput


class StandardConfig(BaseMethodConfig):
    """``method: {name: standard}`` (also what an omitted ``method:`` means): no knobs."""

    name: Literal["standard"] = "standard"


class Standard(Method):
    """Loss = mean per-sample task loss on the clean inputs; no attack, no extra host sync."""

    config_class = StandardConfig

    def loss(self, model, inputs, targets, index, roi=None):
        pred = model(inputs)
        return MethodOutput(loss=self.task.per_sample_loss(pred, targets, roi).mean(), pred=pred)
