"""The ``fractalbench`` command line. It owns the console: tables, progress, one-line errors.

Bad input (unknown names, malformed suites, missing datasets, bad values, broken checkpoints)
prints one line ``fractalbench: error: ...`` and exits with code 2; never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # `run` stopped by SIGTERM (`kill PID`), handled as Ctrl-C: 128 + 15
EXIT_CELLS_FAILED = 1  # `run`: some cell failed (its error is stored as data; the others ran)
EXIT_CHECK_FAILED = 1  # `check`: a contract check failed


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
    from harness.devices import parse_device

    try:
        return parse_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; allowed: cpu, cuda, cuda:N") from None


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line ``fractalbench: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(EXIT_USAGE, f"fractalbench: error: {' '.join(message.split())}{hint}\n")


# `fractalbench compare` options -> reports.compare.Thresholds fields: (metavar, what fails, default)
COMPARE_THRESHOLDS = {
    "accuracy_points": ("POINTS", "fail on a drop of top-1/top-5/policy top-1 by more than POINTS percentage points",
                        "1"),
    "latency_ratio": ("RATIO", "fail on a latency slowdown candidate/baseline of RATIO, >= 1", "1.2"),
    "memory_ratio": ("RATIO", "fail on a memory growth candidate/baseline above RATIO, >= 1", "1.2"),
    "p_value": ("P", "significance level of the latency/memory tests, in (0, 1)", "0.01"),
    "exit_drift_p_value": ("P", "significance level of the exit-histogram chi-square test, in (0, 1)", "0.01"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fractalbench", description="Train and measure dynamic neural networks through suites.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_list, _add_run, _add_show, _add_profile, _add_check, _add_evaluate, _add_report, _add_compare,
                _add_baseline, _add_schema, _add_export):
        add(sub)
    return parser


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="copy a run's results (no checkpoints) to a folder to commit",
                       description="Copy RUN's cell files, results.csv/json, environment, suite, HTML report and its "
                                   "plots/tables to DEST, with a COMMAND file; checkpoints and artifacts stay behind.")
    p.add_argument("run", type=Path, help="run directory (written by `fractalbench run`)")
    p.add_argument("dest", type=Path, help="destination folder, e.g. results/cifar10")
    p.add_argument("--command", dest="run_command", required=True,
                   help="the exact command that made the run, stored as DEST/COMMAND")


def _add_schema(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of suite files (for editors)",
                       description="Print the JSON Schema (draft 2020-12) of a suite YAML file, for editor completion "
                                   "and checking, e.g. `fractalbench schema > suite.schema.json`.")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="write it to FILE instead of stdout")


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models, suites, datasets or policies")
    p.add_argument("what", nargs="?", default="models", choices=("models", "suites", "datasets", "policies"))
    p.add_argument("--pattern", default="*", help="shell-style wildcard on model names (default: *)")


def _add_weights_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-dir", type=Path, default=None, metavar="DIR",
                   help="a folder holding weights files by name: a weights URL whose file is there is read from "
                        "it (hash-checked) instead of downloaded (for machines without network access)")


def _use_weights_dir(args: argparse.Namespace) -> None:
    """Make --weights-dir visible to this process and the cell and measurement processes it starts."""
    folder = getattr(args, "weights_dir", None)
    if folder is None:
        return
    if not folder.is_dir():
        raise CliError(f"--weights-dir {folder} is not a directory")
    from harness.weights import WEIGHTS_DIR_ENV

    os.environ[WEIGHTS_DIR_ENV] = str(folder.resolve())


def _add_weights(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--weights", default=None, metavar="SOURCE", required=required,
                   help="trained weights to load: a file or an https URL (as a suite's `weights:`); a CIFAR ResNet "
                        "checkpoint also loads into the models built on it (sdn:resnet56, branchynet_resnet56, ...)")
    p.add_argument("--weights-sha256", default=None, metavar="HEX", help="the weights file's sha256 (checked)")
    _add_weights_dir(p)


def _weights_config(args: argparse.Namespace) -> object | None:
    """The --weights option as a WeightsConfig (None when not given)."""
    _use_weights_dir(args)
    if getattr(args, "weights", None) is None:
        return None
    from harness.weights import WeightsConfig

    sha = args.weights_sha256
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise CliError(f"--weights-sha256 must be 64 hex digits, got {sha!r}")
    return WeightsConfig(args.weights, sha256=sha)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a suite; results go to --out (running again resumes)")
    p.add_argument("suite", help="suite name (see `fractalbench list suites`) or path to a .yaml file")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<suite>)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME", help="only these models of the suite")
    p.add_argument("--device", nargs="+", type=_device, default=None, metavar="DEVICE",
                   help="override the suite's devices: cpu, cuda, cuda:N")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="read every on-disk dataset of the suite from DIR instead of its `root`")
    _add_weights_dir(p)
    p.add_argument("--remeasure", action="store_true",
                   help="measure the finished cells again from their checkpoints (no retraining); their old "
                        "records go to DIR/stale/remeasure-<time>/")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    p.add_argument("--no-progress", action="store_true", help="hide training progress bars")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="run up to N cells at once, each in its own process (CUDA: one GPU per cell; CPU: the "
                        "threads split between cells); default 1: one after the other in this process "
                        "(--executor slurm: every cell at once)")
    p.add_argument("--executor", choices=("process", "local", "slurm"), default="process",
                   help="where cells run: process (this machine), local (submitit's local executor) or slurm "
                        "(one Slurm job per cell through submitit, resources from the suite's `resources:`; "
                        "--out must be on storage the nodes share)")


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print a run's results as a table")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--metric", nargs="+", default=None, help="only these metrics (e.g. top1 macs latency)")


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="per-module breakdown of one model: MACs, parameters, time share; a dynamic "
                                       "model's cost table (forced exits, cost units)")
    p.add_argument("model", help="registered model name (e.g. resnet56, timm:resnet18)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="image side in pixels (default: the model card's)")
    p.add_argument("--in-chans", type=_positive_int, default=3)
    p.add_argument("--num-classes", type=_positive_int, default=10)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    _add_weights(p)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="run the dynamic contract on random input; one line per check",
                       description="Check MODEL's contract on a random batch: forced exits, real decisions, batch-1 vs "
                                   "batched, cost table vs counted MACs, ops without a MAC formula, real stopping and "
                                   "masked mode (harness/checker.py). Prints one line per check, ok or FAIL: what "
                                   "differs. Exit 0: all ok; 1: a check failed; 2: bad input.")
    p.add_argument("model", help="registered model name (e.g. branchynet_resnet20, sdn:resnet20, timm:resnet18)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="image side in pixels (default: the model card's)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="random samples (default: 8, or 2 x the exits if more; at least 2)")
    _add_weights(p)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-exit accuracy of a model checkpoint (or trained weights) on a dataset's "
                                        "test split")
    p.add_argument("model", help="registered model name the checkpoint was trained as")
    p.add_argument("--checkpoint", type=Path, default=None, help="file written by `run` or harness.distributed")
    _add_weights(p)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root", default="data", help="where torchvision datasets are (default: data)")
    p.add_argument("--image-size", type=_positive_int, default=16)
    p.add_argument("--kwargs", default="{}", help="builder options as JSON (as in the suite)")
    p.add_argument("--device", type=_device, default="cpu")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the self-contained HTML report of one or more runs")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default: <first run>/report.html)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare two runs metric by metric; exit 1 on a regression",
                       description="Compare CANDIDATE with BASELINE (run directories or baseline JSON files) metric by "
                                   "metric. Thresholds: the defaults, then the suites' `compare:` sections, then these "
                                   "options. Exit 0: no regression; 1: a regression; 2: bad input.")
    p.add_argument("baseline", type=Path, help="run directory or baseline JSON file (see `fractalbench baseline`)")
    p.add_argument("candidate", type=Path, help="run directory or baseline JSON file")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                   help="also write the comparison as Markdown (a CI job summary or pull-request comment)")
    p.add_argument("--all", action="store_true", help="print every compared metric, not only the changes")
    for name, (metavar, text, default) in COMPARE_THRESHOLDS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_finite_float, default=None, metavar=metavar,
                       help=f"{text} (default: the suite's `compare: {name}`, else {default})")


def _add_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="write a committed baseline file (JSON) from a run, for `compare`",
                       description="Write RUN's rows to FILE, the baseline `fractalbench compare FILE CANDIDATE` "
                                   "reads. By default only machine-independent metrics are kept (the catalogue's "
                                   "accuracy, exact counts and exit fractions, and failed cells), so a baseline "
                                   "written on one machine gates runs on another; latency and memory only compare on "
                                   "the same machine.")
    p.add_argument("run", type=Path, help="run directory (written by `fractalbench run`)")
    p.add_argument("out", type=Path, metavar="FILE", help="baseline JSON file to write (replaced atomically)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                   help="keep these metrics instead (e.g. top1 macs latency), or `all` for every row")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + error and exits 2 on bad arguments
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from harness.environment import apply_kernel_settings

    apply_kernel_settings()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fractalbench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, ValueError, FileNotFoundError) as exc:
        message = str(exc).strip() or type(exc).__name__
        for line in message.splitlines():  # several problems (a suite's preflight): one line each
            print(f"fractalbench: error: {line}", file=sys.stderr)
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


@contextlib.contextmanager
def _terminate_as_interrupt():  # noqa: ANN202 - yields the list that records a SIGTERM
    """SIGTERM (`kill PID`, a scheduler's stop) stops a run the way Ctrl-C does: finished cells
    saved, running ones stopped. A run started in the background (nohup, `cmd &`) has SIGINT
    ignored, so this is the signal that stops it cleanly. Yields a list that is non-empty after one."""
    seen: list[int] = []

    def stop(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield seen
        return
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, before)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.runner import run_suite
    from harness.suites import load_suite

    suite = load_suite(args.suite)
    _use_weights_dir(args)
    if args.models:
        suite = suite.with_models(args.models)
    if args.data_root is not None:
        if not args.data_root.is_dir():
            raise CliError(f"--data-root {args.data_root} is not a directory")
        suite = suite.with_data_root(str(args.data_root))
    out = args.out or Path("runs") / suite.name
    with _terminate_as_interrupt() as terminated:
        summary = run_suite(suite, out, devices=args.device, progress=not args.no_progress and sys.stderr.isatty(),
                            echo=lambda s: print(s, flush=True), remeasure=args.remeasure, jobs=args.jobs,
                            executor=args.executor)
    print(f"\n{len(summary.finished)} cell(s) finished, {len(summary.skipped)} skipped (already done), "
          f"{len(summary.failed)} failed in {summary.seconds:.1f} s; results in {out}")
    if summary.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{how}: finished cells are saved; run the same command again to resume ({out})", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    if not args.no_report:
        print(f"report: {_write_report([out], None).resolve()}")
    if summary.failed:
        print(f"{len(summary.failed)} cell(s) failed: {', '.join(summary.failed)} (errors in the report and in "
              f"{out}/cells/)", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return EXIT_OK


def _write_report(runs: list[Path], out: Path | None) -> Path:
    from reports.html import write_report

    return write_report(runs, out)


def cmd_show(args: argparse.Namespace) -> int:
    from harness.results import load_run

    frame = load_run(args.run)
    if args.metric:
        frame = frame[frame["metric"].isin(args.metric)]
    if frame.empty:
        print("no rows")
        return EXIT_OK
    cols = ["model", "dataset", "device", "batch_size", "exit", "policy", "threshold", "split", "metric", "unit",
            "value", "p50", "p99", "error"]
    view = frame[[c for c in cols if frame[c].notna().any() and (frame[c] != "").any()]]
    print(view.to_string(index=False, max_colwidth=60))
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from harness.devices import check_device
    from harness.metrics.profile import cost_profile, format_cost_profile, format_profile, profile_model
    from harness.registry import create_model, model_card

    check_device(args.device)
    size = args.input_size or model_card(args.model).input_size
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    weights = _weights_config(args)
    if weights is not None:
        from harness.weights import load_weights

        loaded = load_weights(model, weights, name=args.model)
        print(f"weights: {loaded.source} (sha256 {loaded.sha256[:16]}..., into the {loaded.target})")
    table = profile_model(model, input_size=size, device=args.device, batch_size=args.batch_size,
                          in_chans=args.in_chans)
    print(format_profile(table))
    costs = cost_profile(model, size, args.device, in_chans=args.in_chans)
    if costs:  # a dynamic model: what one sample runs, beside the forward() path above
        print("\n" + format_cost_profile(costs))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from harness.checker import check_registered

    report = check_registered(args.model, args.input_size, args.batch_size, weights=_weights_config(args))
    print(report.text())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from harness.checkpoints import load_checkpoint
    from harness.data import DatasetConfig, load_dataset
    from harness.devices import check_device
    from harness.evaluate import collect_exit_logits, topk_accuracy
    from harness.registry import ModelSpec

    check_device(args.device)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise CliError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise CliError("--kwargs must be a JSON object, e.g. '{\"width\": 2}'")
    weights = _weights_config(args)
    if (weights is None) == (args.checkpoint is None):
        raise CliError("give one of --checkpoint (a fractalbench checkpoint) or --weights (trained weights)")
    splits = load_dataset(DatasetConfig(args.dataset, root=args.root, image_size=args.image_size))
    model = ModelSpec(args.model, kwargs, splits.num_classes, splits.in_chans).build()
    if weights is not None:
        from harness.data import with_normalisation
        from harness.weights import load_weights

        loaded = load_weights(model, weights, name=args.model)
        norm = loaded.normalisation
        if norm is not None:
            splits = with_normalisation(splits, norm.mean, norm.std, norm.declared_by)
        print(f"weights: {loaded.source} (sha256 {loaded.sha256[:16]}..., into the {loaded.target}); normalisation: "
              f"{norm.declared_by if norm else 'the training split statistics (the weights declare none)'}")
    else:
        load_checkpoint(args.checkpoint, model)
    print(f"dataset: {args.dataset} test split ({len(splits.test)} images, {splits.image_size}x{splits.image_size})")
    logits, labels = collect_exit_logits(model, splits.test, 256, args.device)
    rows = [(k, f"{topk_accuracy(exit_logits, labels, 1):.2f}", f"{topk_accuracy(exit_logits, labels, 5):.2f}")
            for k, exit_logits in enumerate(logits)]
    print(_table(("exit", "top1 %", "top5 %"), rows))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    for run in args.runs:
        if not (run / "cells").is_dir():
            raise CliError(f"{run} is not a fractalbench run directory (no cells/ folder)")
    print(f"report: {_write_report(list(args.runs), args.out).resolve()}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from reports.compare import Thresholds, compare_main

    given = {name: getattr(args, name) for name in COMPARE_THRESHOLDS if getattr(args, name) is not None}
    for name, value in given.items():
        try:
            Thresholds(**{name: value})
        except ValueError as exc:
            raise CliError(f"argument --{name.replace('_', '-')}: {exc}") from None
    if args.markdown is not None and args.markdown.is_dir():
        raise CliError(f"--markdown {args.markdown} is a directory; give a file name, "
                       f"e.g. {args.markdown / 'compare.md'}")
    try:
        return compare_main(args.baseline, args.candidate, args.markdown, thresholds=given, verbose=args.all)
    except OSError as exc:  # e.g. the Markdown file cannot be written
        raise CliError(f"{exc.strerror or exc}: {exc.filename or args.markdown}") from None


def cmd_baseline(args: argparse.Namespace) -> int:
    from reports.compare import MACHINE_INDEPENDENT_METRICS, load_source, write_baseline

    if not (args.run / "cells").is_dir():
        raise CliError(f"{args.run} is not a fractalbench run directory (no cells/ folder)")
    if args.out.is_dir():
        raise CliError(f"{args.out} is a directory; give the baseline file name, e.g. {args.out / 'baseline.json'}")
    present = {str(r.get("metric")) for r in load_source(args.run, "run").rows}
    if args.metrics == ["all"]:
        metrics = None
    elif args.metrics:
        unknown = sorted(set(args.metrics) - present)
        if unknown:
            raise CliError(f"run {args.run} has no rows of metric(s) {', '.join(unknown)}; "
                           f"it has: {', '.join(sorted(present))}")
        metrics = set(args.metrics)
    else:
        metrics = set(MACHINE_INDEPENDENT_METRICS)
        if not present & metrics:
            raise CliError(f"run {args.run} has no machine-independent rows ({', '.join(sorted(metrics))}); "
                           f"choose with --metrics from: {', '.join(sorted(present))}")
    try:
        path = write_baseline(args.run, args.out, metrics=metrics)
    except OSError as exc:
        raise CliError(f"cannot write the baseline {args.out}: {exc.strerror or exc}") from None
    import json

    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    kept = sorted({str(r.get("metric")) for r in rows})
    print(f"baseline: {path} ({len(rows)} rows; metrics: {', '.join(kept)})")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from harness.suites import suite_json_schema

    text = json.dumps(suite_json_schema(), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    if args.out.is_dir():
        raise CliError(f"--out {args.out} is a directory; give a file name, e.g. {args.out / 'suite.schema.json'}")
    from harness.results import atomic_write_text

    try:
        atomic_write_text(args.out, text)
    except OSError as exc:
        raise CliError(f"cannot write the schema to {args.out}: {exc.strerror or exc}") from None
    print(f"schema: {args.out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from harness.results import export_run

    if args.dest.exists() and not args.dest.is_dir():
        raise CliError(f"{args.dest} exists and is not a directory")
    written = export_run(args.run, args.dest, args.run_command)
    print(f"exported {len(written)} files to {args.dest}")
    return EXIT_OK


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="simple")


COMMANDS = {"list": cmd_list, "run": cmd_run, "show": cmd_show, "profile": cmd_profile, "check": cmd_check,
            "evaluate": cmd_evaluate,
            "report": cmd_report, "compare": cmd_compare, "baseline": cmd_baseline, "schema": cmd_schema,
            "export": cmd_export}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
