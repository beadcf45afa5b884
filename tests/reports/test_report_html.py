"""The HTML report: one self-contained file, plot and table files beside it, escaped strings."""
import base64
import re

import pytest

from harness.cli import main as cli_main
from harness.results import CellRecord, RunStore, make_row
from reports.html import write_report

from conftest import EVIL_ERROR, EVIL_LABEL, EVIL_SUITE, build_run

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_macs__digits16", "accuracy_vs_latency__digits16__cpu", "per_exit", "exit_histograms",
         "skip_rates", "expert_load", "fractal_patterns", "pattern_complexity")
TABLES = ("summary", "reference", "errors", "per_exit", "latency", "memory", "pareto_macs", "pareto_latency",
          "points_macs", "exit_histograms", "skip_rates", "expert_load", "pattern_analysis", "other_metrics")


def test_report_is_written_at_the_default_path(reported_run):
    run, report = reported_run
    assert report == run / "report.html" and report.stat().st_size > 10_000


def test_every_plot_file_is_written_as_png_and_svg(reported_run):
    folder = reported_run[0] / "report"
    for name in PLOTS:
        png, svg = folder / f"{name}.png", folder / f"{name}.svg"
        assert png.read_bytes().startswith(PNG), name
        assert b"<svg" in svg.read_bytes()[:2000], name
    # the stored PNG pattern is copied beside the plots
    assert any(p.name.endswith("pattern_sierpinski.png") for p in folder.iterdir())


def test_every_table_is_written_as_csv_and_markdown(reported_run):
    folder = reported_run[0] / "report"
    for name in TABLES:
        assert (folder / f"{name}.csv").read_text().count("\n") >= 2, name
        assert (folder / f"{name}.md").read_text().startswith("|"), name
    assert "40550400" in (folder / "summary.csv").read_text()


def test_report_is_self_contained(reported_run):
    text = reported_run[1].read_text()
    # no external resources: every src is a data: URI, no <script>, <link> or url(...)
    srcs = re.findall(r'\bsrc="([^"]*)"', text)
    assert len(srcs) >= len(PLOTS) + 1 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<script|<link|url\(|@import|https?://", text, re.IGNORECASE)
    assert "Content-Security-Policy" in text
    for src in srcs:  # every embedded image decodes to a PNG
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)


def test_every_embedded_string_is_escaped(reported_run):
    text = reported_run[1].read_text()
    for raw in (EVIL_LABEL, EVIL_ERROR, EVIL_SUITE, "<img src=x", "<b>bold"):
        assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; &amp; more" in text
    assert "smoke&lt;b&gt;bold&lt;/b&gt;" in text


def test_report_contents(reported_run):
    text = reported_run[1].read_text()
    for heading in ("Suite and environment", "Summary per model", "Accuracy vs cost (Pareto frontier)",
                    "Per exit: accuracy, MACs, latency", "Exit histograms", "Skip rates", "Expert load",
                    "FractalBrainNet patterns", "Published reference numbers", "Errors"):
        assert f">{heading}<" in text, heading
    assert "Pareto frontier: top-1 vs MACs per image" in text
    front = text.split("Pareto frontier: top-1 vs MACs per image", 1)[1].split("</table>", 1)[0]
    # on the MACs frontier: moe, branchynet's sweep, resnet20 (labelled with the evil label), fractalbrainnet
    for label in ("moe", "branchynet", "&lt;script&gt;alert(1)&lt;/script&gt;", "fractalbrainnet"):
        assert label in front
    assert "skipnet" not in front  # dominated by branchynet's sweep
    assert "He et al. 2016, table 6" in text and "Test CPU" in text and "deadbeef" in text


def test_report_of_a_partial_run_and_an_explicit_out(tmp_path):
    store = RunStore(tmp_path / "old")
    f = {"model": "m", "dataset": "d", "device": "cpu", "cell_id": "c"}
    store.write_cell(CellRecord("c", "ok", [make_row("params", 10, "count", **f), make_row("top1", 50.0, "%", exit=0, **f),
                                            make_row("brand_new_metric", 1.0, "zz", **f)]))
    out = write_report([tmp_path / "old"], tmp_path / "elsewhere" / "r.html")
    text = out.read_text()
    assert out == tmp_path / "elsewhere" / "r.html" and "brand_new_metric" in text and "No environment.json" in text
    assert (tmp_path / "old" / "report" / "summary.csv").exists()


def test_report_of_two_runs_labels_models_by_run(tmp_path):
    a = build_run(tmp_path / "a", models=("resnet20",), failed=False)
    b = build_run(tmp_path / "b", models=("resnet20",), failed=False, latency_factor=2.0)
    text = write_report([a, b]).read_text()
    assert "resnet20 [a]" in text and "resnet20 [b]" in text


def test_bad_paths_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        write_report([tmp_path / "nope"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a fractalbench run directory"):
        write_report([tmp_path / "plain"])
    with pytest.raises(ValueError, match="at least one run"):
        write_report([])


def test_cli_report_command(tmp_path, capsys):
    run = build_run(tmp_path / "cli", models=("resnet20", "moe"), failed=False)
    assert cli_main(["report", str(run), "--out", str(tmp_path / "x.html")]) == 0
    assert "report:" in capsys.readouterr().out and (tmp_path / "x.html").exists()


def test_a_failing_section_does_not_cost_the_report(tmp_path, monkeypatch):
    from reports import tables

    def broken(frame):
        raise RuntimeError("<boom>")

    monkeypatch.setattr(tables, "skip_rates", broken)
    run = build_run(tmp_path / "r", models=("resnet20", "skipnet"), failed=False)
    text = write_report([run]).read_text()
    assert "This section could not be built: RuntimeError: &lt;boom&gt;" in text and "Summary per model" in text
