"""The HTML report: one self-contained file, plot and table files beside it, escaped strings,
the headline plot and short summary first and everything else collapsed."""
import base64
import re

import pytest
from conftest import EVIL_ERROR, EVIL_LABEL, EVIL_SUITE, build_run, foreign_row

from fractalbench.harness.cli import main as cli_main
from fractalbench.harness.results import CellRecord, RunStore, make_row
from fractalbench.reports import blocks
from fractalbench.reports.html import CSP, environment, render_page, write_report
from fractalbench.reports.tables import BRIEF_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_macs__digits16", "accuracy_vs_latency__digits16__cpu", "per_exit", "exit_histograms",
         "skip_rates", "expert_load", "fractal_patterns", "pattern_complexity", "latency_vs_predicted__cpu",
         "accuracy_vs_macs_test_grid__digits16")
TABLES = ("summary", "summary_brief", "reference", "errors", "per_exit", "latency", "memory", "pareto_macs",
          "pareto_latency", "points_macs", "test_grid_macs", "test_grid_latency", "exit_histograms", "skip_rates",
          "expert_load", "routed_compute", "energy", "energy_skipped", "pattern_analysis",
          "training", "latency_vs_predicted", "cost_other", "latency_other", "other_metrics")
ESCAPED_LABEL = "&lt;script&gt;alert(1)&lt;/script&gt;"


def sections(text: str) -> list[tuple[str, str, str]]:
    """(id, class, inner HTML) of every top-level <section>, in page order."""
    return re.findall(r'<section id="([^"]*)" class="([^"]*)">(.*?)</section>', text, re.DOTALL)


def header_cells(table_html: str) -> list[str]:
    return re.findall(r"<th>(.*?)</th>", table_html.split("</thead>", 1)[0])


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
    assert ESCAPED_LABEL in text
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt; &amp; more" in text  # in the errors table
    assert "smoke&lt;b&gt;bold&lt;/b&gt;" in text  # in the title and the suite table
    found = dict((anchor, inner) for anchor, _, inner in sections(text))
    # the hostile label through the summary table, the error text through the error table
    assert ESCAPED_LABEL in found["summary"] and "onerror=&#34;alert(2)&#34;" in found["errors"]
    assert "<title>fractalbench report: smoke&lt;b&gt;bold&lt;/b&gt;</title>" in text


def test_templates_escape_every_kind_of_block():
    evil = '<script>x</script>"'
    figure = blocks.Figure(evil, "AAAA", evil)
    page = render_page(evil, [evil], [blocks.Section(evil, evil, [
        blocks.Note(evil), blocks.ErrorText(evil), blocks.Heading(evil), blocks.Pre(evil),
        blocks.Table([evil], [False], [blocks.TableRow([evil], True)], evil), figure, blocks.Grid([figure]),
        blocks.Details(evil, [blocks.Note(evil)]), blocks.KeyValues([(evil, evil)]), blocks.ItemList([evil]),
        blocks.ErrorTable([blocks.ErrorRow(evil, evil, evil, evil, evil, evil)], True)], hint=evil)])
    assert "<script" not in page and '"<' not in page
    # title, subtitle, anchor, title, hint, 11 blocks (a figure twice, the error row six times, ...)
    assert page.count("&lt;script&gt;x&lt;/script&gt;&#34;") >= 25
    assert environment().autoescape is True


def test_an_undefined_template_name_is_an_error():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ nothing_here }}").render()


def test_headline_plot_first_then_the_summary_then_collapsed_sections(reported_run):
    text = reported_run[1].read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    found = sections(text)
    assert [anchor for anchor, _, _ in found[:2]] == ["headline", "summary"]
    assert [cls for _, cls, _ in found[:2]] == ["open", "open"]
    # the first image of the page is the accuracy-vs-MACs plot with the Pareto frontier
    first_img = re.search(r'<img src="data:image/png;base64,[^"]*" alt="([^"]*)"', text).group(1)
    assert first_img == "Top-1 accuracy vs MACs: digits16" and first_img in found[0][2]
    # every other section is a collapsed <details> (not open), whole
    assert len(found) >= 10
    for anchor, cls, inner in found[2:]:
        assert cls == "collapsed" and inner.startswith("<details><summary><h2>"), anchor
        assert inner.endswith("</details>"), anchor
    assert "<details open" not in text
    for anchor in ("tradeoffs", "errors", "exits", "latency", "memory", "suite", "training", "other"):
        assert anchor in [a for a, _, _ in found[2:]], anchor


def test_summary_has_at_most_the_chosen_columns(reported_run):
    summary = dict((a, inner) for a, _, inner in sections(reported_run[1].read_text()))["summary"]
    brief = summary.split("<details>", 1)[0]  # the wide table is in the collapsed part
    assert brief.count("<table>") == 1
    headers = header_cells(brief)
    assert set(headers) <= {"model", "dataset", "device", *BRIEF_COLUMNS[1:]} and len(headers) <= 12
    assert headers[0] == "model" and "status" in headers and "chosen point" in headers
    assert "confidence@budget0.5" in brief and ESCAPED_LABEL in brief
    wide = summary.split("<details>", 1)[1]
    assert "top5 %" in header_cells(wide.split("<table>", 1)[1]) and "latency p99 ms (b=8)" in wide


def test_latency_is_plotted_against_its_prediction(reported_run, tmp_path):
    text = reported_run[1].read_text()
    latency = dict((a, inner) for a, _, inner in sections(text))["latency"]
    assert 'alt="Measured vs predicted policy latency: cpu"' in latency
    assert (reported_run[0] / "report" / "latency_vs_predicted.csv").read_text().count("\n") == 3  # header + 2
    # without latency_predicted rows there is no such plot (and the latency rows are still there)
    run = build_run(tmp_path / "no_prediction", models=("resnet20", "skipnet"), failed=False)
    other = write_report([run]).read_text()
    assert "Measured vs predicted policy latency" not in other and "every latency row" in other
    assert not (run / "report" / "latency_vs_predicted__cpu.png").exists()


def test_report_contents(reported_run):
    text = reported_run[1].read_text()
    for heading in ("Suite and environment", "Summary per model", "Accuracy vs cost (Pareto frontier)",
                    "Accuracy vs MACs (Pareto frontier)", "Memory", "Training", "Other metrics",
                    "Per exit: accuracy, MACs, latency", "Exit histograms", "Skip rates", "Expert load",
                    "Routed compute: useful against padded", "Energy",
                    "FractalBrainNet patterns", "Published reference numbers", "Errors"):
        assert f">{heading}<" in text, heading
    assert "Pareto frontier: top-1 vs MACs per image" in text
    front = text.split("Pareto frontier: top-1 vs MACs per image", 1)[1].split("</table>", 1)[0]
    # on the MACs frontier (no test-grid point): moe's router, branchynet's budget fit and forced exits,
    # fractalbrainnet; skipnet and resnet20 (labelled with the evil label) are dominated by branchynet's exits
    for label in ("moe", "confidence@budget0.5", "fractalbrainnet"):
        assert label in front
    for label in ("skipnet", ESCAPED_LABEL):
        assert label not in front
    assert ">confidence<" not in front and "top1 95% CI high" in front
    assert "He et al. 2016, table 6" in text and "Test CPU" in text and "deadbeef" in text


def test_report_of_a_partial_run_and_an_explicit_out(tmp_path):
    store = RunStore(tmp_path / "old")
    f = {"model": "m", "dataset": "d", "device": "cpu", "cell_id": "c"}
    rows = [make_row("params", 10, "count", **f), make_row("top1", 50.0, "%", exit=0, **f),
            foreign_row("brand_new_metric", 1.0, "zz", **f)]
    store.write_cell(CellRecord("c", "ok", rows))
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
    from fractalbench.reports import tables

    def broken(frame):
        raise RuntimeError("<boom>")

    monkeypatch.setattr(tables, "skip_rates", broken)
    run = build_run(tmp_path / "r", models=("resnet20", "skipnet"), failed=False)
    text = write_report([run]).read_text()
    assert "This section could not be built: RuntimeError: &lt;boom&gt;" in text and "Summary per model" in text
    dynamic = dict((a, inner) for a, _, inner in sections(text))["dynamic"]
    assert "Exits, skips and experts" in dynamic and "could not be built" in dynamic


def test_the_suite_section_names_the_machines_the_cells_ran_on():
    from types import SimpleNamespace as Cell

    from fractalbench.reports.sections import machines_of

    epyc = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "cpu_native_bf16": False, "torch_threads": 2}
    xeon = {"cpu": "Intel Xeon", "cpu_capability": "AVX512", "cpu_native_bf16": True, "gpu": "NVIDIA H200"}
    cells = [Cell(meta={"machine": epyc}), Cell(meta={}), Cell(meta={"machine": epyc}), Cell(meta={"machine": xeon})]
    assert machines_of(cells) == ("AMD EPYC (AVX2, no native bf16): 2 cell(s); not recorded (cells from before it "
                                  "was): 1 cell(s); Intel Xeon (AVX512, native bf16), NVIDIA H200: 1 cell(s)")
    assert machines_of([]) == "no cells"
