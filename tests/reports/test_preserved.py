"""Cost at preserved accuracy (fractalbench.reports.points.preserved_accuracy): the cheapest point chosen without
test within 1 point of the full network, by hand-made rows whose answer is known: a cheaper test-grid
point and a fitted point that loses more are passed over."""
from pathlib import Path

import pandas as pd
import pytest

from fractalbench.harness.results import CellRecord, RunStore, make_row
from fractalbench.reports import tables
from fractalbench.reports.html import write_report

M = 1_000_000


def cell(store: RunStore, model: str, exits: list[tuple[float, float, float]],
         points: list[tuple[str, float | None, float, float, float | None, str]]) -> None:
    """exits: (top1 %, MACs, batch-1 ms) per forced exit; points: (policy, threshold, top1 %, MACs,
    stream ms or None, fitted_on)."""
    f = {"model": model, "variant": model, "dataset": "digits16", "device": "cpu", "suite": "t",
         "cell_id": f"{model}__digits16__cpu"}
    rows = []
    for k, (top1, macs, ms) in enumerate(exits):
        rows += [make_row("top1", top1, "%", split="test", n=1000, exit=k, **f),
                 make_row("macs", macs, "MACs", exit=k, batch_size=1, **f),
                 make_row("latency", ms, "ms", exit=k, batch_size=1, n=50, **f)]
    for policy, threshold, top1, macs, ms, fitted_on in points:
        key = {"policy": policy, "threshold": threshold, **f}
        rows += [make_row("policy_top1", top1, "%", split="test", n=1000, detail={"fitted_on": fitted_on}, **key),
                 make_row("expected_macs", macs, "MACs", n=1000, batch_size=1, **key)]
        if ms is not None:
            rows.append(make_row("latency", ms, "ms", batch_size=1, n=50, **key))
    meta = {"model": model, "dataset": "digits16", "device": "cpu",
            "card": {"family": "x", "paper": "x", "dynamic_kind": "early_exit", "reference": {}}}
    store.write_cell(CellRecord(f["cell_id"], "ok", rows, meta=meta))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preserved") / "run"
    store = RunStore(path)
    cell(store, "ee", [(60.0, 10 * M, 1.0), (80.0, 30 * M, 3.0)], [
        ("confidence@budget0.25", None, 70.0, 15 * M, 1.5, "validation"),  # loses 10 points
        ("confidence@budget0.5", None, 79.5, 20 * M, 2.0, "validation"),   # the answer
        ("confidence@budget0.75", None, 79.9, 25 * M, 2.5, "validation"),  # within, but dearer
        ("confidence", 0.3, 80.0, 12 * M, 1.2, "none (grid point)"),       # cheaper and better: scored on test
    ])
    cell(store, "lossy", [(50.0, 5 * M, 1.0), (75.0, 20 * M, 2.0)], [
        ("entropy@budget0.5", None, 73.5, 10 * M, None, "validation"),     # loses 1.5
    ])
    store.write_tables()
    return path


def test_the_cheapest_fitted_point_within_one_point_and_its_savings(run):
    table = tables.preserved_accuracy(tables.combined_rows(tables.load_runs([run]))).set_index("model")
    ee = table.loc["ee"]
    assert ee["point"] == "confidence@budget0.5" and ee["its top1 %"] == 79.5 and ee["its MACs"] == 20 * M
    assert ee["full top1 %"] == 80.0 and ee["full MACs"] == 30 * M
    assert ee["MACs avoided %"] == pytest.approx(100 / 3) and ee["speed-up (b=1)"] == pytest.approx(1.5)
    lossy = table.loc["lossy"]
    assert pd.isna(lossy["point"]) and lossy["full top1 %"] == 75.0 and pd.isna(lossy["MACs avoided %"])
    looser = tables.preserved_accuracy(tables.combined_rows(tables.load_runs([run])), points=2.0).set_index("model")
    assert looser.loc["lossy", "point"] == "entropy@budget0.5" and pd.isna(looser.loc["lossy", "speed-up (b=1)"])


def test_the_report_shows_it_in_the_tradeoffs(run):
    html = write_report([run]).read_text()
    assert "Cost at preserved accuracy (within 1 point of the full network)" in html
    md = (run / "report" / "preserved_accuracy.md").read_text()
    assert "confidence@budget0.5" in md and "confidence 0.3" not in md
