"""``MlflowTracking``: the trainer's link to its MLflow run (metrics every epoch, figures, checkpoints, model)."""

from __future__ import annotations

from pathlib import Path

from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys

from pipeline.adversarial.state import SampleState
from pipeline.names import Keys as Ours
from pipeline.tracking.figures import adversarial_grid, eps_histogram, segmentation_overlays
from pipeline.tracking.session import TrackingSession


class MlflowTracking:
    """Logs, at every epoch end, the trainer's and the validator's metrics, the eps histogram, a grid of
    clean / adversarial / difference images and, when ``overlays`` (an ``AdversarialValidation``) holds
    validation cases of this epoch, their segmentation overlays; every ``iteration_every`` iterations the
    training loss.
    Everything goes through ``TrackingSession``, so a tracking outage is recorded instead of raised."""

    def __init__(self, session: TrackingSession, output_dir: Path, state: SampleState | None = None,
                 validator: Engine | None = None, iteration_every: int = 10, overlays=None):
        self.session = session
        self.figures = Path(output_dir) / "figures"
        self.state = state
        self.validator = validator
        self.iteration_every = max(1, iteration_every)
        self.overlays = overlays

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.iteration_every), self.iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch)

    def iteration(self, engine: Engine) -> None:
        self.session.log_metrics({"iter_loss": float(engine.state.output[Keys.LOSS].detach())},
                                 step=engine.state.iteration)

    def epoch(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        metrics = {k: v for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        validated = self.validator is not None and self.validator.state.epoch == epoch
        if validated:
            metrics.update({k: v for k, v in self.validator.state.metrics.items() if isinstance(v, (int, float))})
        metrics["epoch_time_s"] = engine.state.times.get("EPOCH_COMPLETED") or 0.0
        if validated:
            metrics["val_time_s"] = self.validator.state.times.get("EPOCH_COMPLETED") or 0.0
        self.session.log_metrics(metrics, step=epoch)
        if self.state is not None:
            hist = eps_histogram(self.state.eps, self.figures / f"eps_hist_epoch{epoch:03d}.png", f"epoch {epoch}")
            self.session.log_artifact(hist, "eps_histograms")
        adv = engine.state.output.get(Ours.ADV)
        if adv is not None:
            grid = adversarial_grid(engine.state.output[Keys.IMAGE], adv, self.figures / f"adv_grid_epoch{epoch:03d}.png")
            self.session.log_artifact(grid, "adversarial_grids")
        if validated and self.overlays is not None and self.overlays.cases:
            figure = segmentation_overlays(self.overlays.cases, self.figures / f"overlays_epoch{epoch:03d}.png")
            self.session.log_artifact(figure, "segmentation_overlays")
