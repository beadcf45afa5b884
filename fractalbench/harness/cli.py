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
    from fractalbench.harness.devices import parse_device

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


# `fractalbench compare` options -> fractalbench.reports.compare.Thresholds fields: (metavar, what fails, default)
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
    for add in (_add_list, _add_run, _add_show, _add_profile, _add_check, _add_validate, _add_evaluate, _add_report,
                _add_compare, _add_baseline, _add_schema, _add_export):
        add(sub)
    return parser


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="copy a run's results (no checkpoints) to a folder to commit",
                       description="Copy RUN's cell files, results.csv/json, environment, suite, HTML report and its "
                                   "plots/tables to DEST, with a COMMAND file; checkpoints and artifacts stay behind.")
    p.add_argument("run", type=Path, help="run directory (written by `fractalbench run`)")
    p.add_argument("dest", type=Path, help="destination folder, e.g. results/cifar10")
    p.add_argument("--command", dest="run_command", default=None,
                   help="the exact command that made the run, stored as DEST/COMMAND (default: the command line "
                        "the run's environment.json recorded, its last `fractalbench run`)")


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
    from fractalbench.harness.weights import WEIGHTS_DIR_ENV

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
    from fractalbench.harness.weights import WeightsConfig

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
    p.add_argument("--rerun", nargs="+", default=None, metavar="MODEL",
                   help="run these models' finished cells again from scratch (by label or model name; the cells "
                        "that start from them too); their old records and checkpoints go to DIR/stale/rerun-<time>/")
    p.add_argument("--force", action="store_true", help="run every finished cell again from scratch (--rerun of "
                                                        "every model)")
    p.add_argument("--from", dest="seed_from", type=Path, default=None, metavar="EXPORT",
                   help="first take the finished cells of an exported run (`fractalbench export`, e.g. "
                        "results/cifar10) whose suite entries are unchanged, so only the rest run (a reference run "
                        "continued in another session); a cell that others start from comes only with them")
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
    p = sub.add_parser("show", help="print a run's results as a table",
                       description="Print a run's results: one row per model and operating point (exit, or policy "
                                   "and threshold), one column per metric with its unit; --long prints one row per "
                                   "result row instead. Filters take names or shell patterns (sdn*).")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--model", nargs="+", default=None, metavar="NAME", help="only these models (labels, or patterns)")
    p.add_argument("--metric", nargs="+", default=None, help="only these metrics (e.g. top1 macs latency)")
    p.add_argument("--exit", nargs="+", type=int, default=None, metavar="K", help="only these exits")
    p.add_argument("--policy", nargs="+", default=None, metavar="NAME",
                   help="only these policies (confidence, confidence@budget0.5, alpha, ...; patterns allowed)")
    p.add_argument("--long", action="store_true", help="one line per result row (metric, unit, value, p50, p99)")


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
                       description="Check MODEL's contract on a random batch: exit shapes, forced exits, real "
                                   "decisions, batch-1 vs batched, cost table vs counted MACs, ops without a MAC "
                                   "formula, real stopping and masked mode (fractalbench/harness/checker.py). Prints "
                                   "one line per check, ok or FAIL: what differs (a model that raises is a FAIL, "
                                   "never a traceback). Exit 0: all ok; 1: a check failed; 2: bad input.")
    p.add_argument("model", help="registered model name (e.g. branchynet_resnet20, sdn:resnet20, timm:resnet18)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="image side in pixels (default: the model card's)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="random samples (default: 8, or 2 x the exits if more; at least 2)")
    _add_weights(p)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a suite without running it: every problem at once, no run directory",
                       description="Check SUITE as `run` does before its first cell (the schema, every model built "
                                   "with its options and a batch through every exit, weights found and fitting, "
                                   "batch sizes against the data) and print every problem, one line each. A "
                                   "dataset whose files are not here is checked at its known shape and said so. "
                                   "Exit 0: the suite can run; 2: problems.")
    p.add_argument("suite", help="suite name (see `fractalbench list suites`) or path to a .yaml file")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="read every on-disk dataset of the suite from DIR instead of its `root`")
    _add_weights_dir(p)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-exit accuracy of a model checkpoint (or trained weights) on a dataset's "
                                        "test split")
    p.add_argument("model", nargs="?", default=None,
                   help="registered model name (default: the one the checkpoint records; a different one is refused)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="file written by `run` or by `torchrun -m fractalbench.harness.distributed`")
    _add_weights(p)
    p.add_argument("--dataset", default=None,
                   help="dataset of the test split (default: the one the checkpoint was trained on, else digits)")
    p.add_argument("--root", default="data", help="where torchvision datasets are (default: data)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side (default: the one the checkpoint's model was trained at, else 16)")
    p.add_argument("--kwargs", default=None, help="builder options as JSON (as in the suite; default: the "
                                                  "checkpoint's)")
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
    p.add_argument("--allow-missing", action="store_true",
                   help="a cell of the baseline that the candidate lacks is listed as missing instead of failing")
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


def working_directory_importable() -> None:
    """Make the working directory importable, as ``python -m`` does and as import paths
    (``mynets.nets:build``) need: the ``fractalbench`` script's own folder is first on ``sys.path``
    instead. Appended, so no folder there can shadow an installed package; cell and measurement
    processes inherit this search path."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path and os.path.abspath(".") not in map(os.path.abspath, sys.path):
        sys.path.append(cwd)


def main(argv: Sequence[str] | None = None) -> int:
    working_directory_importable()
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + error and exits 2 on bad arguments
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from fractalbench.harness.environment import apply_kernel_settings

    apply_kernel_settings()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader went away (`fractalbench show RUN | head`): nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
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
        from fractalbench.harness.registry import list_models, list_prefixes, model_card

        names = list_models(args.pattern)
        rows = [(n, model_card(n).family, model_card(n).dynamic_kind, model_card(n).paper[:60]) for n in names]
        print(_table(("model", "family", "kind", "paper"), rows))
        print(f"\nprefixes: {', '.join(p + ':NAME' for p in list_prefixes())}")
    elif args.what == "suites":
        from fractalbench.harness.suites import list_suites, load_suite

        rows = []
        for name in list_suites():
            suite = load_suite(name)
            rows.append((name, len(suite.models), ", ".join(d.label for d in suite.datasets), suite.description[:60]))
        print(_table(("suite", "models", "datasets", "description"), rows))
    elif args.what == "datasets":
        from fractalbench.harness.data import DATASET_NAMES

        print("\n".join(DATASET_NAMES))
    else:
        from fractalbench.harness.policies import policy_names

        print("\n".join(policy_names()))
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
    from fractalbench.harness.runner import run_suite
    from fractalbench.harness.suites import load_suite

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
                            executor=args.executor, seed_from=args.seed_from,
                            rerun=[m.display for m in suite.models] if args.force else args.rerun)
    print(f"\n{len(summary.finished)} cell(s) finished, {len(summary.skipped)} skipped (already done), "
          f"{len(summary.failed)} failed in {summary.seconds:.1f} s; results in {out}")
    if summary.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{how}: finished cells are saved; run the same command again to resume ({out})", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    if not args.no_report:
        if not summary.finished and _report_is_current(out):
            print(f"report: {(out / 'report.html').resolve()} (up to date: no cell changed since it was "
                  f"written; `fractalbench report {out}` draws it again)")
        else:
            print(f"report: {_write_report([out], None).resolve()}")
    if summary.failed:
        print(f"{len(summary.failed)} cell(s) failed: {', '.join(summary.failed)} (errors in the report and in "
              f"{out}/cells/)", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return EXIT_OK


def _report_is_current(run: Path) -> bool:
    """Whether ``run``'s report.html was written after every cell file and outcome (a resume that ran
    nothing then leaves it as it is: seconds instead of redrawing every plot). The run's suite.json and
    environment.json are rewritten by every resume and do not count."""
    report = run / "report.html"
    if not report.is_file():
        return False
    inputs = [p for folder in ("cells", "outcomes") for p in (run / folder).glob("*") if p.is_file()]
    written = report.stat().st_mtime_ns
    return all(p.stat().st_mtime_ns <= written for p in inputs)


def _write_report(runs: list[Path], out: Path | None) -> Path:
    from fractalbench.reports.html import write_report

    return write_report(runs, out)


def _matching(values: Sequence[str], wanted: Sequence[str], what: str, run: Path, known: Sequence[str] = ()) -> set:
    """The ``values`` that one of ``wanted`` (names or shell patterns) matches; CliError naming the close
    matches (among ``known`` too) for a name that matches nothing."""
    import difflib
    import fnmatch

    present = sorted(set(values))
    chosen = set()
    for want in wanted:
        hits = {v for v in present if fnmatch.fnmatchcase(str(v), str(want))}
        if not hits:
            pool = list(dict.fromkeys([str(v) for v in present] + list(known)))
            close = difflib.get_close_matches(str(want), [v for v in pool if v != str(want)], n=3, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            known_note = " (a known metric, but this run has no row of it)" if want in known else ""
            raise CliError(f"--{what} {want}: no such {what} in {run}{known_note}{hint} (there: "
                           f"{', '.join(map(str, present[:30]))}{', ...' if len(present) > 30 else ''})")
        chosen |= hits
    return chosen


def readable(value: object, unit: str = "") -> str:
    """A number for people: counts, MACs and FLOPs in k/M/G, others to 4 significant digits; ""
    for missing values."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, (int, float)):
        return str(value)
    v = float(value)
    if unit in ("MACs", "FLOPs", "count", "params", "bytes") and abs(v) >= 1e3:
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.4g} {suffix}"
    if unit == "%":
        return f"{v:.2f}"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


#: The metrics `show` puts in its columns when no --metric is given (the others: --metric or --long).
SHOW_METRICS = ("params", "top1", "policy_top1", "macs", "expected_macs", "latency", "memory_peak_activations")


def cmd_show(args: argparse.Namespace) -> int:
    import pandas as pd

    from fractalbench.harness.catalogue import names
    from fractalbench.harness.results import load_run

    frame = load_run(args.run)
    if frame.empty:
        raise CliError(f"{args.run} holds no result rows yet")
    if args.model:
        frame = frame[frame["model"].isin(_matching(frame["model"].dropna(), args.model, "model", args.run))]
    if args.metric:
        chosen = _matching(frame["metric"].dropna(), args.metric, "metric", args.run, sorted(names()))
        frame = frame[frame["metric"].isin(chosen)]
    if args.exit is not None:
        exits = frame["exit"].dropna().astype(int)
        _matching([str(e) for e in exits], [str(e) for e in args.exit], "exit", args.run)
        frame = frame[frame["exit"].isin(args.exit)]
    if args.policy:
        policies = frame["policy"].fillna("").astype(str)
        frame = frame[policies.isin(_matching([p for p in policies if p], args.policy, "policy", args.run))]
    if frame.empty:
        raise CliError(f"no row of {args.run} passes all the filters given")
    hidden = []
    if not args.metric and not args.long:
        hidden = sorted(set(frame["metric"].dropna()) - set(SHOW_METRICS))
        frame = frame[frame["metric"].isin(SHOW_METRICS) | frame["error"].fillna("").astype(bool)]
    frame = frame.copy()
    frame["exit"] = frame["exit"].map(lambda e: "" if pd.isna(e) else str(int(e)))
    frame["threshold"] = frame["threshold"].map(lambda v: "" if pd.isna(v) else f"{float(v):g}")
    frame["policy"] = frame["policy"].fillna("")
    if args.long:
        cols = ["model", "dataset", "device", "batch_size", "exit", "policy", "threshold", "split", "metric", "unit",
                "value", "p50", "p99", "error"]
        view = frame[[c for c in cols if frame[c].notna().any() and (frame[c].astype(str) != "").any()]].copy()
        for col in ("value", "p50", "p99"):
            if col in view:
                view[col] = [readable(v, u) for v, u in zip(view[col], frame["unit"].fillna(""))]
        if "batch_size" in view:
            view["batch_size"] = view["batch_size"].map(lambda b: "" if pd.isna(b) else str(int(b)))
        print(view.fillna("").to_string(index=False, max_colwidth=60))
        return EXIT_OK

    def column(row: pd.Series) -> str:
        label = str(row["metric"])
        if not pd.isna(row["batch_size"]) and row["unit"] in ("ms", "MiB", "samples/s", "images/s"):
            label += f" b={int(row['batch_size'])}"
        if isinstance(row["split"], str) and row["split"] not in ("", "test"):
            label += f" [{row['split']}]"
        return label + (f" ({row['unit']})" if isinstance(row["unit"], str) and row["unit"] else "")

    frame["column"] = frame.apply(column, axis=1)
    frame["shown"] = [readable(v, u) if not (isinstance(e, str) and e) else f"error: {e[:40]}"
                      for v, u, e in zip(frame["value"], frame["unit"].fillna(""), frame["error"])]
    index = ["model", "dataset", "device", "exit", "policy", "threshold"]
    wide = frame.pivot_table(index=index, columns="column", values="shown", aggfunc="first", sort=False)
    order = list(dict.fromkeys(frame["column"]))
    wide = wide[[c for c in order if c in wide.columns]].reset_index().fillna("")
    keep = [c for c in wide.columns if c not in index or (wide[c].astype(str) != "").any()]
    print(wide[keep].to_string(index=False, max_colwidth=40))
    if hidden:
        print(f"\n{len(hidden)} more metric(s) in this run: {', '.join(hidden)} (--metric NAME..., or --long)")
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from fractalbench.harness.devices import check_device
    from fractalbench.harness.metrics.profile import cost_profile, format_cost_profile, format_profile, profile_model
    from fractalbench.harness.registry import create_model, model_card

    check_device(args.device)
    size = args.input_size or model_card(args.model).input_size
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    weights = _weights_config(args)
    if weights is not None:
        from fractalbench.harness.weights import load_weights

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
    from fractalbench.harness.checker import check_registered, failed_report

    weights = _weights_config(args)
    try:
        report = check_registered(args.model, args.input_size, args.batch_size, weights=weights)
    except (CliError, ValueError, FileNotFoundError):
        raise  # bad input: one line, exit 2
    except Exception as exc:  # noqa: BLE001 - a defect of the model (e.g. its builder raises): FAIL, exit 1
        report = failed_report(f"building or loading {args.model} failed: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:400]}")
    print(report.text())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _json_kwargs(text: str | None) -> dict | None:
    import json

    if text is None:
        return None
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise CliError("--kwargs must be a JSON object, e.g. '{\"width\": 2}'")
    return kwargs


def _evaluation_setup(args: argparse.Namespace, spec: dict) -> tuple[str, dict, object, list[str]]:
    """(model name, kwargs, DatasetConfig, lines saying what was used and why) for ``evaluate``: what
    the checkpoint recorded unless the command line says otherwise; a model or kwargs that differ from
    the checkpoint's are refused (its tensors were trained for that model)."""
    from fractalbench.harness.data import DatasetConfig

    where = f"checkpoint {args.checkpoint}" if args.checkpoint else "the weights"
    recorded_name, recorded_kwargs = spec.get("name"), spec.get("kwargs")
    if args.model and recorded_name and args.model != recorded_name:
        raise CliError(f"{where} holds a {recorded_name!r} model; MODEL {args.model!r} was given (leave it out to "
                       f"use the checkpoint's)")
    name = args.model or recorded_name
    if not name:
        raise CliError(f"give MODEL: {where} does not record which model it holds")
    kwargs = _json_kwargs(args.kwargs)
    if kwargs is not None and recorded_kwargs is not None and kwargs != recorded_kwargs:
        raise CliError(f"--kwargs {json_dumps(kwargs)} differ from the ones {where} was trained with "
                       f"({json_dumps(recorded_kwargs)}); leave --kwargs out to use them")
    kwargs = kwargs if kwargs is not None else dict(recorded_kwargs or {})
    data = spec.get("data") or {}
    entry = dict(data.get("dataset") or {})
    used = [f"model: {name} {json_dumps(kwargs)}" + (" (as the checkpoint records)" if recorded_name else "")]
    if args.dataset is not None and entry and args.dataset != entry.get("name"):
        used.append(f"note: the model was trained on {entry.get('name')}; evaluating on {args.dataset} as asked")
        entry = {}
    if args.dataset is not None:
        entry["name"] = args.dataset
    entry.setdefault("name", "digits")
    size = args.image_size or data.get("image_size") or (None if data else 16)
    if args.image_size and data.get("image_size") and args.image_size != data["image_size"]:
        used.append(f"note: the model was trained at {data['image_size']}x{data['image_size']}; evaluating at "
                    f"{args.image_size}x{args.image_size} as asked")
    entry["image_size"] = size
    fields = set(DatasetConfig.__dataclass_fields__)
    config = DatasetConfig(**{k: v for k, v in entry.items() if k in fields}, root=args.root)
    if not data and args.checkpoint is not None:
        used.append(f"note: {where} records no data (written before fractalbench recorded it); using --dataset "
                    f"{config.name} at {size}x{size}")
    return name, kwargs, config, used


def json_dumps(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def _same_statistics(a: dict | None, b: dict | None) -> bool:
    if not a or not b:
        return False
    pairs = list(zip(a.get("mean", []), b.get("mean", []))) + list(zip(a.get("std", []), b.get("std", [])))
    return len(pairs) == 2 * len(a.get("mean", [])) and all(abs(float(x) - float(y)) < 1e-5 for x, y in pairs)


def cmd_validate(args: argparse.Namespace) -> int:
    from fractalbench.harness.data import DatasetError, load_dataset, stand_in_splits
    from fractalbench.harness.preflight import check_suite
    from fractalbench.harness.suites import SuiteError, load_suite

    suite = load_suite(args.suite)
    _use_weights_dir(args)
    if args.data_root is not None:
        if not args.data_root.is_dir():
            raise CliError(f"--data-root {args.data_root} is not a directory")
        suite = suite.with_data_root(str(args.data_root))
    from fractalbench.harness._disk_data import missing_files

    splits, notes, checked = {}, [], list(suite.datasets)
    for ds in suite.datasets:  # datasets of a known shape are not decoded: their shape is all the checks need
        stand_in = stand_in_splits(ds)
        missing = missing_files(ds) if stand_in is not None and not ds.download else None
        try:
            splits[ds] = stand_in if stand_in is not None and missing is None else load_dataset(ds)
        except DatasetError as exc:
            missing = missing or str(exc).splitlines()[0]
            if stand_in is None:
                notes.append(f"note: {missing}; its models are not checked here")
                checked.remove(ds)
                continue
            splits[ds] = stand_in
        if missing is not None and stand_in is not None:
            notes.append(f"note: {missing}; its models were checked at its known shape ({stand_in.in_chans}x"
                         f"{stand_in.image_size}x{stand_in.image_size}, {stand_in.num_classes} classes); "
                         "`run` needs the files")
    unreachable: list[str] = []
    problems = check_suite(suite.model_copy(update={"datasets": tuple(checked)}), splits, unreachable)
    notes += [f"note: {line} (not checked: `run` needs the file)" for line in dict.fromkeys(unreachable)]
    for line in notes:
        print(line)
    if problems:
        raise SuiteError("\n".join(problems))
    cells = sum(len([d for d in suite.datasets if not m.datasets or d.label in m.datasets]) for m in suite.models) \
        * len(suite.devices) * max(1, len(suite.seeds or ()))
    print(f"suite {suite.path}: ok ({len(suite.models)} model(s), {len(suite.datasets)} dataset(s), "
          f"{len(suite.devices)} device(s): {cells} cell(s))")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fractalbench.harness.checkpoints import load_model_state, read_checkpoint
    from fractalbench.harness.data import load_dataset, with_normalisation
    from fractalbench.harness.devices import check_device
    from fractalbench.harness.evaluate import collect_exit_logits, topk_accuracy
    from fractalbench.harness.registry import ModelSpec

    check_device(args.device)
    weights = _weights_config(args)
    if (weights is None) == (args.checkpoint is None):
        raise CliError("give one of --checkpoint (a fractalbench checkpoint) or --weights (trained weights)")
    state = read_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    spec = dict((state or {}).get("spec") or {})
    name, kwargs, config, used = _evaluation_setup(args, spec)
    splits = load_dataset(config)
    recorded = (spec.get("data") or {})
    for field, what in (("num_classes", "classes"), ("in_chans", "input channels")):
        if field in spec and int(spec[field]) != int(getattr(splits, field)):
            raise CliError(f"checkpoint {args.checkpoint} was trained for {spec[field]} {what}; dataset "
                           f"{config.name} has {getattr(splits, field)}")
    model = ModelSpec(name, kwargs, splits.num_classes, splits.in_chans).build()
    if weights is not None:
        from fractalbench.harness.weights import load_weights

        loaded = load_weights(model, weights, name=name)
        norm = loaded.normalisation
        if norm is not None:
            splits = with_normalisation(splits, norm.mean, norm.std, norm.declared_by)
        used.append(f"weights: {loaded.source} (sha256 {loaded.sha256[:16]}..., into the {loaded.target})")
        declared = norm.declared_by if norm else "the training split statistics (the weights declare none)"
        used.append(f"normalisation: {declared}")
    else:
        load_model_state(model, state, args.checkpoint)
        trained = recorded.get("normalisation")
        now = splits.info.get("normalisation")
        same_data = (recorded.get("dataset", {}).get("name") == config.name
                     and recorded.get("image_size") == splits.image_size)
        if trained and same_data and not _same_statistics(trained, now):
            try:
                splits = with_normalisation(splits, trained["mean"], trained["std"], f"checkpoint {args.checkpoint}")
            except ValueError as exc:
                raise CliError(f"checkpoint {args.checkpoint} was trained on inputs normalised with mean "
                               f"{trained['mean']} std {trained['std']}; {exc}") from None
            now = splits.info.get("normalisation")
        if now:
            source = trained.get("from", "the training split") if trained and _same_statistics(trained, now) else \
                now.get("from", "the training split")
            used.append(f"normalisation: mean {[round(v, 4) for v in now['mean']]} std "
                        f"{[round(v, 4) for v in now['std']]} ({source}"
                        f"{', as the checkpoint records' if _same_statistics(trained, now) else ''})")
    for line in used:
        print(line)
    print(f"dataset: {config.name} test split ({len(splits.test)} images, {splits.image_size}x{splits.image_size})"
          + (" (as the checkpoint records)" if recorded and args.dataset is None and args.image_size is None else ""))
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
    from fractalbench.reports.compare import Thresholds, compare_main

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
        return compare_main(args.baseline, args.candidate, args.markdown, thresholds=given, verbose=args.all,
                            allow_missing=args.allow_missing)
    except OSError as exc:  # e.g. the Markdown file cannot be written
        raise CliError(f"{exc.strerror or exc}: {exc.filename or args.markdown}") from None


def cmd_baseline(args: argparse.Namespace) -> int:
    from fractalbench.reports.compare import MACHINE_INDEPENDENT_METRICS, load_source, write_baseline

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

    from fractalbench.harness.suites import suite_json_schema

    text = json.dumps(suite_json_schema(), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    if args.out.is_dir():
        raise CliError(f"--out {args.out} is a directory; give a file name, e.g. {args.out / 'suite.schema.json'}")
    from fractalbench.harness.results import atomic_write_text

    try:
        atomic_write_text(args.out, text)
    except OSError as exc:
        raise CliError(f"cannot write the schema to {args.out}: {exc.strerror or exc}") from None
    print(f"schema: {args.out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from fractalbench.harness.results import export_run

    if args.dest.exists() and not args.dest.is_dir():
        raise CliError(f"{args.dest} exists and is not a directory")
    command = args.run_command or _recorded_command(args.run)
    written = export_run(args.run, args.dest, command)
    print(f"command: {command}")
    print(f"exported {len(written)} files to {args.dest}")
    return EXIT_OK


def _recorded_command(run: Path) -> str:
    """The `fractalbench run ...` command line ``run``'s environment.json recorded (CliError without one)."""
    import json
    import shlex

    path = run / "environment.json"
    try:
        argv = json.loads(path.read_text(encoding="utf-8")).get("argv") or []
    except (OSError, ValueError):
        argv = []
    if len(argv) < 2 or "run" not in argv[1:]:
        raise CliError(f"{path} records no `fractalbench run` command line; give --command")
    first = Path(str(argv[0])).name
    program = "fractalbench" if first in ("fractalbench", "__main__.py", "cli.py") else shlex.quote(str(argv[0]))
    return " ".join([program, *(shlex.quote(str(a)) for a in argv[1:])])


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="simple")


COMMANDS = {"list": cmd_list, "run": cmd_run, "show": cmd_show, "profile": cmd_profile, "check": cmd_check,
            "evaluate": cmd_evaluate, "validate": cmd_validate,
            "report": cmd_report, "compare": cmd_compare, "baseline": cmd_baseline, "schema": cmd_schema,
            "export": cmd_export}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
