"""The ``fractalbench`` command line. It owns the console: tables, progress, one-line errors.

Bad input (unknown names, malformed suites, missing datasets, bad values, broken checkpoints)
prints one line ``fractalbench: error: ...`` and exits with code 2; never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """An error to report as one line with exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; allowed: cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fractalbench", description="Train and measure dynamic neural networks through suites.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list", help="list registered models, suites, datasets or policies")
    p.add_argument("what", nargs="?", default="models", choices=("models", "suites", "datasets", "policies"))
    p.add_argument("--pattern", default="*", help="shell-style wildcard on model names (default: *)")

    p = sub.add_parser("run", help="run a suite; results go to --out (running again resumes)")
    p.add_argument("suite", help="suite name (see `fractalbench list suites`) or path to a .yaml file")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<suite>)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME", help="only these models of the suite")
    p.add_argument("--device", nargs="+", type=_device, default=None, metavar="DEVICE", help="override the suite's devices: cpu, cuda, cuda:N")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    p.add_argument("--no-progress", action="store_true", help="hide training progress bars")

    p = sub.add_parser("show", help="print a run's results as a table")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--metric", nargs="+", default=None, help="only these metrics (e.g. top1 macs latency)")

    p = sub.add_parser("profile", help="per-module breakdown of one model: MACs, parameters, time share")
    p.add_argument("model", help="registered model name (e.g. resnet56, timm:resnet18)")
    p.add_argument("--input-size", type=_positive_int, default=None, help="image side in pixels (default: the model card's)")
    p.add_argument("--in-chans", type=_positive_int, default=3)
    p.add_argument("--num-classes", type=_positive_int, default=10)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--batch-size", type=_positive_int, default=1)

    p = sub.add_parser("evaluate", help="per-exit accuracy of a model checkpoint on a dataset's test split")
    p.add_argument("model", help="registered model name the checkpoint was trained as")
    p.add_argument("--checkpoint", type=Path, required=True, help="file written by `run` or harness.distributed")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root", default="data", help="where torchvision datasets are (default: data)")
    p.add_argument("--image-size", type=_positive_int, default=16)
    p.add_argument("--kwargs", default="{}", help="builder options as JSON (as in the suite)")
    p.add_argument("--device", type=_device, default="cpu")

    p = sub.add_parser("report", help="write the self-contained HTML report of one or more runs")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default: <first run>/report.html)")

    p = sub.add_parser("compare", help="compare two runs metric by metric; exit 1 on a regression")
    p.add_argument("baseline", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--markdown", type=Path, default=None, help="also write the comparison as Markdown")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + error and exits 2 on bad arguments
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fractalbench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, ValueError, FileNotFoundError) as exc:
        message = str(exc).strip() or type(exc).__name__
        print(f"fractalbench: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from harness.registry import list_models, list_prefixes, model_card

        names = list_models(args.pattern)
        rows = [(n, model_card(n).family, model_card(n).dynamic_kind, model_card(n).paper[:60]) for n in names]
        print(_table(("model", "family", "kind", "paper"), rows))
        print(f"\nprefixes: {', '.join(p + ':NAME' for p in list_prefixes())}")
    elif args.what == "suites":
        from harness.suites import list_suites, load_suite

        rows = []
        for name in list_suites():
            suite = load_suite(name)
            rows.append((name, len(suite.models), ", ".join(d.label for d in suite.datasets), suite.description[:60]))
        print(_table(("suite", "models", "datasets", "description"), rows))
    elif args.what == "datasets":
        from harness.data import DATASET_NAMES

        print("\n".join(DATASET_NAMES))
    else:
        from harness.policies import POLICY_NAMES

        print("\n".join(POLICY_NAMES))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from harness.runner import run_suite
    from harness.suites import load_suite

    suite = load_suite(args.suite)
    if args.models:
        suite = suite.with_models(args.models)
    out = args.out or Path("runs") / suite.name
    summary = run_suite(suite, out, devices=args.device, progress=not args.no_progress and sys.stderr.isatty(),
                        echo=lambda s: print(s, flush=True))
    print(f"\n{len(summary.finished)} cell(s) finished, {len(summary.skipped)} skipped (already done), "
          f"{len(summary.failed)} failed in {summary.seconds:.1f} s; results in {out}")
    if summary.interrupted:
        print(f"interrupted: finished cells are saved; run the same command again to resume ({out})", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.no_report:
        report = _write_report([out], None)
        if report is not None:
            print(f"report: {report.resolve()}")
    return EXIT_OK


def _write_report(runs: list[Path], out: Path | None) -> Path | None:
    try:
        from reports.html import write_report
    except ImportError:
        return None
    return write_report(runs, out)


def cmd_show(args: argparse.Namespace) -> int:
    from harness.results import load_run

    frame = load_run(args.run)
    if args.metric:
        frame = frame[frame["metric"].isin(args.metric)]
    if frame.empty:
        print("no rows")
        return EXIT_OK
    cols = ["model", "dataset", "device", "batch_size", "exit", "policy", "split", "metric", "unit", "value", "p50", "p99", "error"]
    view = frame[[c for c in cols if frame[c].notna().any() and (frame[c] != "").any()]]
    print(view.to_string(index=False, max_colwidth=60))
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    try:
        from harness.metrics.profile import format_profile, profile_model
    except ImportError as exc:
        raise CliError(f"profiling is not available: {exc}") from None
    from harness.registry import model_card
    from harness.suites import check_device

    check_device(args.device)
    size = args.input_size or model_card(args.model).input_size
    table = profile_model(args.model, input_size=size, device=args.device, batch_size=args.batch_size,
                          in_chans=args.in_chans, num_classes=args.num_classes)
    print(format_profile(table))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from harness.checkpoints import load_checkpoint
    from harness.data import DatasetConfig, load_dataset
    from harness.evaluate import collect_exit_logits, topk_accuracy
    from harness.registry import ModelSpec
    from harness.suites import check_device

    check_device(args.device)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise CliError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise CliError("--kwargs must be a JSON object, e.g. '{\"width\": 2}'")
    splits = load_dataset(DatasetConfig(args.dataset, root=args.root, image_size=args.image_size))
    model = ModelSpec(args.model, kwargs, splits.num_classes, splits.in_chans).build()
    load_checkpoint(args.checkpoint, model)
    logits, labels = collect_exit_logits(model, splits.test, 256, args.device)
    rows = [(k, f"{topk_accuracy(l, labels, 1):.2f}", f"{topk_accuracy(l, labels, 5):.2f}") for k, l in enumerate(logits)]
    print(_table(("exit", "top1 %", "top5 %"), rows))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    for run in args.runs:
        if not (run / "cells").is_dir():
            raise CliError(f"{run} is not a fractalbench run directory (no cells/ folder)")
    path = _write_report(list(args.runs), args.out)
    if path is None:
        raise CliError("the HTML report is not available in this build")
    print(f"report: {path.resolve()}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        from reports.compare import compare_main
    except ImportError:
        raise CliError("run comparison is not available in this build") from None
    return compare_main(args.baseline, args.candidate, args.markdown)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="simple")


COMMANDS = {"list": cmd_list, "run": cmd_run, "show": cmd_show, "profile": cmd_profile, "evaluate": cmd_evaluate, "report": cmd_report, "compare": cmd_compare}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
