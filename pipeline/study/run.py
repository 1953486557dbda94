"""``medrobust study STUDY.yaml``: train every variant, evaluate each with the same protocol, table them.

In MLflow the study is a parent run (tag ``medrobust.kind=study``) with one nested child run per variant
(tag ``mlflow.parentRunId``, MLflow's convention); the table, curves and per-class recall are the parent's
artifacts, the study's wall times are metrics of each child.

Re-running a study is safe and cheap: a variant evaluated earlier with the same resolved config (digest in
``<output_dir>/<variant>/variant.json``) is skipped; one interrupted while training continues from its
last checkpoint (``train(cfg, resume=...)``, same MLflow run); one interrupted while evaluating is
evaluated again; a variant whose config changed is trained anew. The parent run is re-opened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipeline.config import Config
from pipeline.model.checkpoint import load_checkpoint
from pipeline.names import format_eps
from pipeline.study.spec import Study, config_digest, stored_digest
from pipeline.study.state import StudyState, VariantState
from pipeline.study.table import VariantResult, read_metrics, write_results
from pipeline.tracking.session import TrackingSession


@dataclass
class StudyResult:
    parent_run_id: str
    output_dir: Path
    table: pd.DataFrame
    states: dict[str, VariantState]
    files: list[Path]


def _say(study: Study, i: int, name: str, what: str) -> None:
    print(f"study {study.spec.name} [{i}/{len(study.configs)}] {name}: {what}", flush=True)


def _epochs_done(ckpt: dict, cfg: Config) -> bool:
    """The checkpoint was written at the end of the last epoch (train() would start over from it: ignite
    re-initialises a finished engine)."""
    n_train = int((ckpt.get("data") or {}).get("n_train") or 0)
    per_epoch = -(-n_train // cfg.train.batch_size) if n_train else 0
    return int(ckpt["epoch"]) >= cfg.train.epochs and int(ckpt["iteration"]) >= cfg.train.epochs * per_epoch


class StudyRunner:
    def __init__(self, study: Study):
        self.study = study
        first = next(iter(study.configs.values()))
        self.session = TrackingSession(first.tracking.uri, study.experiment, study.output_dir,
                                       offline_ok=first.tracking.offline_ok)
        self.client = self.session.client
        self.state = StudyState.load(study.output_dir)

    # -- the parent run ------------------------------------------------------------------------------------
    def open_parent(self) -> str:
        s = self.study
        reuse = self.state.parent_run_id if self.state.tracking_uri == self.session.uri else None
        params = {"study": {"name": s.spec.name, "base": str(s.spec.base), "variants": list(s.configs),
                            "set": dict(s.spec.shared), "evaluate": dict(s.spec.evaluate)}}
        first = next(iter(s.configs.values()))
        parent = self.session.start(f"study-{s.spec.name}", params, tags={
            "medrobust.kind": "study", "medrobust.study": s.spec.name, "medrobust.task": first.task,
            "medrobust.dataset": first.data.dataset_tag()}, run_id=reuse)
        if parent != reuse:
            self.session.log_artifact(s.path, "study")
            self.session.log_artifact(s.base_path, "study")
        self.state.parent_run_id, self.state.tracking_uri = parent, self.session.uri
        self.state.save()
        return parent

    # -- one variant ---------------------------------------------------------------------------------------
    def variant(self, i: int, name: str, cfg: Config) -> VariantState:
        st = VariantState.load(self.study.variant_dir(name))
        digest = config_digest(cfg.resolved())
        if st.digest and st.digest != digest and self._same_settings(st, digest):
            st.digest = digest          # written by an earlier version of the config's layout, same settings
        if st.digest and st.digest != digest:
            _say(self.study, i, name, f"its config changed since the last run ({st.digest} -> {digest}): "
                                      "trained anew")
            if st.run_id:  # the earlier child run stays in MLflow, marked as not the study's result
                self._on_run(st.run_id, st.folder, lambda run: run.set_tags({"medrobust.study.superseded": "true"}))
            st = VariantState(st.folder)
        st.digest = digest
        if st.status == "evaluated" and st.evaluation_dir and (st.folder / st.evaluation_dir / "metrics.csv").is_file():
            _say(self.study, i, name, f"finished earlier with the same config (MLflow run {st.run_id}): skipped")
            return st
        if st.status not in ("trained", "evaluated"):  # evaluated but its files are gone: evaluate again
            self._train(i, name, cfg, st)
        self._evaluate(i, name, cfg, st)
        return st

    @staticmethod
    def _same_settings(st: VariantState, digest: str) -> bool:
        """The variant's ``config.yaml`` is the one its recorded digest was taken of, and read as today's config
        it has the digest ``digest``."""
        path = st.folder / "config.yaml"
        try:
            raw = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(raw, dict) and config_digest(raw) == st.digest and stored_digest(raw) == digest

    def _train(self, i: int, name: str, cfg: Config, st: VariantState) -> None:
        from pipeline.engine.run import train

        ckpt = load_checkpoint(st.checkpoint) if st.checkpoint.is_file() else None
        if ckpt is not None and stored_digest(ckpt.get("config") or {}) != st.digest:
            ckpt = None  # left by another config of this variant
        if ckpt is not None and st.attempt_started is not None:  # the interrupted attempt's time, up to its last save
            st.train_s += max(0.0, st.checkpoint.stat().st_mtime - st.attempt_started)
        if ckpt is not None and _epochs_done(ckpt, cfg):
            _say(self.study, i, name, f"training had finished (epoch {ckpt['epoch']}) before the interruption")
            st.run_id = ckpt.get("mlflow_run_id")
            self._on_run(st.run_id, st.folder, lambda run: run.log_artifact(st.checkpoint, "checkpoints"),
                         status="FINISHED")
        else:
            if ckpt is not None:
                _say(self.study, i, name, f"resuming from {st.checkpoint} (epoch {ckpt['epoch']}, iteration "
                                          f"{ckpt['iteration']}, MLflow run {ckpt.get('mlflow_run_id')})")
            else:
                self._close_stale_runs(name)
                _say(self.study, i, name, f"training {cfg.method.name} for {cfg.train.epochs} epochs")
            st.status, st.attempt_started, st.attempts = "training", time.time(), st.attempts + 1
            st.save()
            started = time.perf_counter()
            result = train(cfg, resume=str(st.checkpoint) if ckpt is not None else None)
            st.train_s += time.perf_counter() - started
            st.run_id = result.run_id
        st.status, st.attempt_started = "trained", None
        st.save()

    def _close_stale_runs(self, name: str) -> None:
        """Child runs of this variant left RUNNING by an attempt killed before its first checkpoint (left as they
        are while the server is away: a later run of the study closes them)."""
        if not self.state.parent_run_id or self.session.down:
            return
        try:
            exp = self.client.get_experiment_by_name(self.study.experiment)
            stale = [] if exp is None else self.client.search_runs(
                [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{self.state.parent_run_id}' and "
                                     f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'")
        except Exception as exc:  # noqa: BLE001 - the server went away: nothing to close now
            print(f"study {self.study.spec.name}: {name}: could not look for runs left open by an interrupted "
                  f"attempt ({type(exc).__name__}); a later run of the study closes them", flush=True)
            return
        for run in stale:
            self._on_run(run.info.run_id, self.study.variant_dir(name), lambda _: None, status="KILLED")

    def _on_run(self, run_id: str | None, folder: Path, log, status: str | None = None) -> None:
        """``log(session)`` into the variant's MLflow run ``run_id``, then set its ``status`` (None: unchanged),
        through a :class:`TrackingSession` attached to it: while the server is away the calls are recorded in
        ``folder/unlogged.json``, beside what the variant's training recorded for that run, for ``medrobust
        sync``, and the study goes on."""
        if not run_id:
            return
        run = TrackingSession(self.session.uri, self.study.experiment, folder, unreachable="record",
                              activity="study")
        run.attach(run_id)
        log(run)
        run.end(status)
        if run.summary():
            print(run.summary(), flush=True)

    def _evaluate(self, i: int, name: str, cfg: Config, st: VariantState) -> None:
        from pipeline.evaluation.run import evaluate

        _say(self.study, i, name, "evaluating")
        started = time.perf_counter()
        ev = evaluate(cfg, checkpoint=str(st.checkpoint))
        st.degenerate = ev.verdict.reason if ev.verdict else None
        st.eval_s = time.perf_counter() - started
        st.run_id = st.run_id or ev.run_id
        st.evaluation_dir = ev.output_dir.name
        st.status = "evaluated"
        st.save()

        def timings(run: TrackingSession) -> None:
            run.log_metrics({"study_train_s": st.train_s, "study_eval_s": st.eval_s}, step=0)
            run.set_tags({"medrobust.study": self.study.spec.name})
        self._on_run(ev.run_id, st.folder, timings)

    # -- the comparison ------------------------------------------------------------------------------------
    def protocol(self) -> str:
        ev = next(iter(self.study.configs.values())).evaluate
        radii = "; ".join(f"{n} eps {', '.join(format_eps(e) for e in (ev.eps_l2 if n == 'L2' else ev.eps_linf))}"
                          for n in ev.norms)
        apgd = self.study.task == "classification" and ev.apgd
        parts = ((f"APGD-CE and APGD-T ({ev.apgd_targets} target class(es)) in the worst case", apgd),
                 ("white noise of the same radii", ev.noise), ("FGSM", ev.fgsm))
        extra = ", ".join(text for text, on in parts if on)
        return (f"Protocol: PGD-{ev.steps} x {ev.restarts} restart(s), worst case over losses {', '.join(ev.losses)}; "
                f"{radii}; {extra}; schedule {ev.schedule}; {ev.split} split ({ev.max_samples or 'all'} samples). "
                f"Base config {self.study.spec.base}; variants {', '.join(self.study.configs)}.")

    def run(self) -> StudyResult:
        study = self.study
        parent = self.open_parent()
        print(f"study {study.spec.name}: {len(study.configs)} variants, output {study.output_dir}, MLflow parent run "
              f"{parent} (experiment '{study.experiment}', {self.session.uri})", flush=True)
        states: dict[str, VariantState] = {}
        try:
            for i, (name, cfg) in enumerate(study.configs.items(), start=1):
                cfg.tracking.parent_run_id = parent
                states[name] = self.variant(i, name, cfg)
            results = [VariantResult(name, cfg.method.name, read_metrics(st.folder / st.evaluation_dir / "metrics.csv"),
                                     st.train_s, st.eval_s, st.degenerate)
                       for (name, cfg), st in zip(study.configs.items(), states.values(), strict=True)]
            written = write_results(study.output_dir, f"study {study.spec.name}", self.protocol(), results, study.task)
        except BaseException:
            self.session.end("KILLED")
            raise
        for path in written.files:
            self.session.log_artifact(path)
        self.session.end("FINISHED")
        for line in [*written.warnings, *(c for c in written.checks if c.startswith("FAIL"))]:
            print(f"study {study.spec.name}: {line}", flush=True)
        others = ", ".join(path.name for path in written.files[1:])
        print(f"study {study.spec.name}: results in {written.files[0]} (and {others}); MLflow parent run {parent}",
              flush=True)
        return StudyResult(parent, study.output_dir, written.table, states, written.files)


def run_study(path: str | Path) -> StudyResult:
    """Run (or continue) the study file ``path``."""
    return StudyRunner(Study(path)).run()
