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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medrobust", description="Adversarially robust medical imaging on MONAI, tracked in MLflow.")
    parser.add_argument("--verbose", "-v", action="store_true", help="more detail (and tracebacks)")
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

    sy = sub.add_parser("sync", help="upload what a run could not log while its MLflow server was away")
    sy.add_argument("output_dir", help="the run's train.output_dir (holds unlogged.json)")
    sy.add_argument("--tracking-uri", default=None, help="log to this URI instead of the recorded one")

    qs = sub.add_parser("quickstart", help="train and evaluate IMA on built-in synthetic data, logged to MLflow")
    qs.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    qs.add_argument("--output-dir", default=None, help="where checkpoints go (default: ./outputs/quickstart)")
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
    if args.command == "quickstart":
        from pipeline.quickstart import quickstart

        quickstart(epochs=args.epochs, output_dir=args.output_dir)
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
