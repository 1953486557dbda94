"""PGD adversarial training (Madry et al.): the loss on PGD inputs at a fixed radius."""

from __future__ import annotations

from pipeline.adversarial.methods.adversarial import AttackingMethod, batch_metrics
from pipeline.adversarial.methods.base import MethodOutput
from pipeline.adversarial.pgd import pgd


class PGDAT(AttackingMethod):
    """K-step PGD at ``cfg.eps`` (step ``alpha * eps / K``), loss = mean task loss on the adversarial inputs.

    ``MethodOutput.pred`` is the output on the ADVERSARIAL inputs (the only forward this method needs; a
    clean forward would cost more than the 5% budget of SPEC 6 leaves), so training metrics computed from
    it are adversarial accuracy / Dice.
    """

    name = "pgd_at"

    def loss(self, model, inputs, targets, index):
        x_adv = pgd(model, inputs, targets, self.cfg.eps, **self.attack_kwargs())
        pred = model(x_adv)
        adv = self.task.per_sample_loss(pred, targets).mean()
        return MethodOutput(loss=adv, pred=pred, adv=x_adv, metrics=batch_metrics(adv_loss=adv))
