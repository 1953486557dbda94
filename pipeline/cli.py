"""The ``medrobust`` command line. Bad input is reported as one line per problem with exit code 2, no traceback.

Subcommands import their implementation lazily so that ``medrobust --help`` stays fast; no other module
imports this one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from pipeline.errors import EXIT_BAD_INPUT, EXIT_TRAINING_FAULT, InputError, NumericalFault


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. --set train.epochs=2 (repeatable)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medrobust")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medrobust", description="Adversarially robust medical imaging on MONAI, tracked in MLflow.")
    parser.add_argument("--verbose", "-v", action="store_true", help="more detail (and tracebacks)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate the whole dataset of a config and print a summary")
    _add_config_args(check)
    check.add_argument("--verbose", "-v", action="store_true", dest="verbose_sub", help="more detail")

    train = sub.add_parser("train", help="train a model with the config's adversarial method")
    _add_config_args(train)
    train.add_argument("--resume", metavar="PATH", help="checkpoint to resume from (same state and epoch)")

    ev = sub.add_parser("evaluate", help="robustness evaluation of a trained model")
    _add_config_args(ev)
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="checkpoint file written by medrobust train")
    src.add_argument("--run-id", metavar="ID", help="MLflow run whose final checkpoint is evaluated; 'latest': the newest finished run of the "
                          "config's experiment and method")

    rep = sub.add_parser("report", help="compare the runs of an MLflow experiment side by side")
    rep.add_argument("--experiment", required=True, help="MLflow experiment name")
    rep.add_argument("--out", default=None, help="output folder (default: report-<experiment>)")
    rep.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")

    sy = sub.add_parser("sync", help="upload what a training or an evaluation could not log while its MLflow "
                                     "server was away")
    sy.add_argument("output_dir", help="the folder that holds unlogged.json: the run's train.output_dir, or its "
                                       "evaluation-<run> folder")
    sy.add_argument("--tracking-uri", default=None, help="log to this URI instead of the recorded one")

    st = sub.add_parser("study", help="train and evaluate several method variants with one protocol, one table")
    st.add_argument("study", help="study YAML file (see studies/); run it again to continue an interrupted study")

    qs = sub.add_parser("quickstart", help="train standard and IMA on built-in synthetic data, evaluate both under "
                                           "attack, side by side, logged to MLflow")
    qs.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    qs.add_argument("--samples", type=int, default=None, help="number of synthetic images (default 720)")
    qs.add_argument("--output-dir", default=None, help="where checkpoints go (default: ./outputs/quickstart)")

    pr = sub.add_parser("predict", help="predict new images or volumes with a trained model")
    pr.add_argument("model", metavar="RUN_ID|CHECKPOINT", help="MLflow run id, or a checkpoint file of medrobust train")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image/volume files or folders of them")
    pr.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    pr.add_argument("--margin", action="store_true", help="also each prediction's smallest breaking radius under "
                                                          "the model's evaluation attack")
    pr.add_argument("--steps", type=int, default=None, help="PGD steps of --margin (default: the model's "
                                                            "evaluate.steps)")
    pr.add_argument("--batch-size", type=int, default=16, help="2D images per batch")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    pr.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")

    ex = sub.add_parser("export", help="export a trained model as a MONAI bundle (also logged to its MLflow run)")
    ex.add_argument("model", metavar="RUN_ID|CHECKPOINT", help="MLflow run id, or a checkpoint file of medrobust train")
    ex.add_argument("--bundle", required=True, metavar="DIR", help="bundle folder to write")
    ex.add_argument("--no-log", action="store_true", help="do not log the bundle to the model's MLflow run")
    ex.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.config import load_config  # noqa: PLC0415 - imports stay lazy for a fast --help

    if args.command == "data":
        from pipeline.data.check import run_check

        cfg = load_config(args.config, args.overrides)
        return run_check(cfg, verbose=args.verbose or args.verbose_sub)
    if args.command == "train":
        from pipeline.engine.run import train

        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
        return 0
    if args.command == "evaluate":
        from pipeline.evaluation.run import evaluate

        cfg = load_config(args.config, args.overrides)
        evaluate(cfg, checkpoint=args.checkpoint, run_id=args.run_id)
        return 0
    if args.command == "report":
        from pipeline.evaluation.report import report

        report(args.experiment, out=args.out, tracking_uri=args.tracking_uri)
        return 0
    if args.command == "sync":
        from pipeline.tracking.sync import sync

        done, left = sync(args.output_dir, tracking_uri=args.tracking_uri)
        print(f"uploaded {done} items" + (f"; {left} still failing (run sync again later)" if left else ""))
        return 0 if not left else 1
    if args.command == "study":
        from pipeline.study.run import run_study

        run_study(args.study)
        return 0
    if args.command == "quickstart":
        from pipeline.quickstart import quickstart

        quickstart(epochs=args.epochs, output_dir=args.output_dir, samples=args.samples)
        return 0
    if args.command == "predict":
        from pipeline.deploy.predict import predict

        predict(args.model, args.inputs, args.out, margin=args.margin, steps=args.steps, batch_size=args.batch_size,
                device=args.device, tracking_uri=args.tracking_uri)
        return 0
    if args.command == "export":
        from pipeline.deploy.bundle import export_bundle

        export_bundle(args.model, args.bundle, tracking_uri=args.tracking_uri, log=not args.no_log)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # MONAI announces on every DICOM read that the optional GPU decoder is absent
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    try:
        return _dispatch(args)
    except InputError as exc:
        for line in exc.problems:
            print(f"medrobust: error: {line}", file=sys.stderr)
        if args.verbose or os.environ.get("MEDROBUST_TRACEBACK"):
            raise
        return EXIT_BAD_INPUT
    except NumericalFault as exc:
        print(f"medrobust: stopped: {exc}", file=sys.stderr)
        return EXIT_TRAINING_FAULT
    except KeyboardInterrupt:
        print("medrobust: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
