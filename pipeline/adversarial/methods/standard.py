"""Standard (non-adversarial) training through the method interface."""

from __future__ import annotations

from pipeline.adversarial.methods.base import Method, MethodOutput


class Standard(Method):
    """Loss = mean per-sample task loss on the clean inputs; no attack, no extra host sync."""

    name = "standard"

    def loss(self, model, inputs, targets, index, roi=None):
        pred = model(inputs)
        return MethodOutput(loss=self.task.per_sample_loss(pred, targets, roi).mean(), pred=pred)
