"""Honest headlines: a threshold grid point scored on test never reaches the summary, the headline
plots, the Pareto frontier or the points tables, even when it beats every other point; it stays in
its own test-grid view. Selection labels, the near-frontier rule, and the intervals drawn."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CARDS, build_run, latency_row, model_rows
from matplotlib.colors import to_rgb
from matplotlib.container import ErrorbarContainer

from fractalbench.harness.results import CellRecord, RunStore, make_row
from fractalbench.harness.stats import accuracy_interval
from fractalbench.reports import plots, tables
from fractalbench.reports.html import write_report
from fractalbench.reports.points import is_chosen

# The planted grid point: cheapest and most accurate of all, in MACs and in latency.
GRID_TOP1, GRID_MACS, GRID_THRESHOLD = 99.37, 1_234_567, 0.42
MODELS = ("resnet20", "branchynet", "skipnet", "moe", "fractalbrainnet")


def dominated_run(path: Path) -> Path:
    """The fixture's five models, branchynet with one more confidence grid point (threshold 0.42,
    fitted_on "none (grid point)") at 99.37 % for 1,234,567 MACs and a 0.05 ms stream."""
    rng = np.random.default_rng(0)
    store = RunStore(path)
    for model in MODELS:
        rows = model_rows(model, rng)
        if model == "branchynet":
            f = {k: rows[0][k] for k in ("model", "variant", "dataset", "device", "suite", "cell_id")}
            key = {"policy": "confidence", "threshold": GRID_THRESHOLD, **f}
            rows += [make_row("policy_top1", GRID_TOP1, "%", split="test", n=1000, **key,
                              detail={"fitted_on": "none (grid point)"}),
                     make_row("expected_macs", GRID_MACS, "MACs", n=1000, batch_size=1, **key),
                     latency_row(rng, 0.05, 100, batch_size=1, description="confidence[0.42]", **key)]
        meta = {"model": model, "dataset": "digits16", "device": "cpu", "card": {"paper": "x", **CARDS[model]}}
        store.write_cell(CellRecord(rows[0]["cell_id"], "ok", rows, meta=meta))
    store.write_tables()
    return path


def frame_of(run: Path) -> pd.DataFrame:
    return tables.combined_rows(tables.load_runs([run]))


def is_planted(points: pd.DataFrame) -> pd.Series:
    return (points["accuracy"] == GRID_TOP1) & (points["policy"] == "confidence")


def drawn_xy(fig) -> set[tuple[float, float]]:
    """Every (x, y) of every line and marker drawn on the figure's axes."""
    return {(float(x), float(y)) for ax in fig.axes for line in ax.lines
            for x, y in zip(line.get_xdata(), line.get_ydata())}


def drawn_bars(fig) -> list[tuple[float, float, float, tuple, float]]:
    """Every vertical error bar: (x, low, high, rgb colour, line width)."""
    out = []
    for ax in fig.axes:
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                for col in container.lines[2]:
                    for (x0, y0), (_, y1) in col.get_segments():
                        out.append((float(x0), min(y0, y1), max(y0, y1), to_rgb(col.get_color()[0]),
                                    float(col.get_linewidth()[0])))
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> pd.DataFrame:
    return frame_of(dominated_run(tmp_path_factory.mktemp("planted") / "run"))


def test_the_planted_grid_point_would_dominate_everything(planted):
    grid = tables.grid_points(planted, "macs")
    row = grid[is_planted(grid)]
    assert row[["selection", "threshold", "cost"]].values.tolist() == [["test grid", GRID_THRESHOLD, GRID_MACS]]
    points = tables.operating_points(planted, "macs")
    # cheaper and more accurate than every headline point: it would be the whole frontier
    assert GRID_MACS < points["cost"].min() and GRID_TOP1 > points["accuracy"].max()
    lat_grid = tables.grid_points(planted, "latency")
    lat = tables.operating_points(planted, "latency")
    assert lat_grid.loc[is_planted(lat_grid), "cost"].item() < lat["cost"].min()


def test_no_headline_number_comes_from_the_planted_point(planted):
    summary = tables.summary_table(planted)
    assert not (summary.select_dtypes("number") == GRID_TOP1).any().any()
    assert not (summary.select_dtypes("number") == GRID_MACS).any().any()
    row = summary.set_index("label").loc["branchynet"]
    assert [row["chosen point"], row["its top1 %"], row["its expected MACs"]] == ["confidence@budget0.5", 88.0, 20e6]
    brief = tables.brief_summary(summary).set_index("model")
    assert brief.loc["branchynet", "its top1 %"] == 88.0 and GRID_TOP1 not in brief.to_numpy()
    chosen = tables.chosen_points(planted)
    assert GRID_TOP1 not in chosen["accuracy"].tolist() and GRID_MACS not in chosen["cost"].tolist()
    assert chosen.set_index("label")["policy"].to_dict() == {"branchynet": "confidence@budget0.5",
                                                             "moe": "router", "skipnet": "gates"}
    for cost in ("macs", "latency"):
        points = tables.operating_points(planted, cost)
        assert not is_planted(points).any() and "test grid" not in set(points["selection"])
        assert "confidence" not in set(points["policy"])
    front = tables.operating_points(planted, "macs")
    front = front[front["pareto"]]
    assert sorted(zip(front["label"], front["cost"])) == [  # the forced exits are headline points too
        ("branchynet", 10e6), ("branchynet", 20e6), ("branchynet", 25e6), ("branchynet", 40e6),
        ("fractalbrainnet", 120e6), ("moe", 15e6)]


def test_headline_plots_draw_no_test_grid_point_and_the_grid_view_does(planted):
    figures = plots.tradeoff_figures(planted)
    assert [f.name for f in figures] == ["accuracy_vs_macs__digits16", "accuracy_vs_latency__digits16__cpu"]
    for f in figures:
        assert not is_planted(f.points).any()
        assert GRID_TOP1 not in {y for _, y in drawn_xy(f.figure)}, f.name
        planted_bar = pytest.approx(accuracy_interval(GRID_TOP1, 1000))
        assert not [b for b in drawn_bars(f.figure) if (b[1], b[2]) == planted_bar], f.name
    macs_drawn = drawn_xy(figures[0].figure)
    assert (20e6, 88.0) in macs_drawn and (15e6, 87.0) in macs_drawn  # the budget fit and the router are drawn
    (grid,) = plots.grid_figures(planted)
    assert grid.title == "Top-1 accuracy vs MACs: digits16: test grid (not for model selection)"
    assert (float(GRID_MACS), GRID_TOP1) in drawn_xy(grid.figure)
    assert set(grid.points["selection"]) == {"test grid"} and len(grid.points) == 7  # 6 fixture thresholds + 1
    assert "not for model selection" not in figures[0].title and "Out: threshold grid points" in figures[0].caption


def test_the_report_shows_the_planted_point_only_in_the_test_grid_part(tmp_path):
    run = dominated_run(tmp_path / "run")
    text = write_report([run]).read_text()
    found = dict((a, inner) for a, _, inner in
                 re.findall(r'<section id="([^"]*)" class="([^"]*)">(.*?)</section>', text, re.DOTALL))
    assert "99.37" not in found["headline"] and "99.37" not in found["summary"]
    before, after = found["tradeoffs"].split("<h3>Test grid (not for model selection)</h3>", 1)
    assert "99.37" not in before and "1,234,567" not in before
    assert "99.37" in after and "1,234,567" in after
    assert 'alt="Top-1 accuracy vs MACs: digits16: test grid (not for model selection)"' in after
    folder = run / "report"
    for name in ("summary", "summary_brief", "points_macs", "pareto_macs", "points_latency", "pareto_latency"):
        assert "99.37" not in (folder / f"{name}.csv").read_text(), name
    grid = pd.read_csv(folder / "test_grid_macs.csv")
    assert grid.loc[grid["threshold"] == GRID_THRESHOLD, "top1 %"].tolist() == [GRID_TOP1]
    assert (folder / "accuracy_vs_macs_test_grid__digits16.png").stat().st_size > 1000


def test_near_frontier_on_hand_made_points():
    # frontier: a=(1, 80), b=(2, 85). Off it: c=(3, 84) reaches 85 exactly (inside), d=(3, 83) ends at
    # 84.99 (just outside), e=(1.5, 79) must reach only a's 80 (b costs more than e), f=(1.5, 78)
    # ends at 79.99, g=(4, 84) without an interval
    costs = [1, 2, 3, 3, 1.5, 1.5, 4]
    accs = [80, 85, 84, 83, 79, 78, 84]
    high = [99, 99, 85.0, 84.99, 80.0, 79.99, np.nan]
    front = tables.pareto_mask(costs, accs)
    assert front.tolist() == [True, True, False, False, False, False, False]
    near = tables.near_frontier_mask(costs, accs, high, front)
    assert near.tolist() == [False, False, True, False, True, False, False]
    with pytest.raises(ValueError, match="equal lengths"):
        tables.near_frontier_mask([1, 2], [1, 2], [1], [True, False])


def test_near_frontier_from_stored_intervals(tmp_path):
    # four static models on 1,000 test images: the frontier is a (5M, 70 %) and b (10M, 90 %); c at 89 %
    # has a Wilson upper end of 90.8 (reaches b's 90: indistinguishable); d at 88 % ends at 89.87 (does not)
    store = RunStore(tmp_path / "four")
    for name, macs, top1 in (("a", 5e6, 70.0), ("b", 10e6, 90.0), ("c", 20e6, 89.0), ("d", 30e6, 88.0)):
        f = {"model": name, "dataset": "d", "device": "cpu", "cell_id": name}
        store.write_cell(CellRecord(name, "ok", [make_row("top1", top1, "%", exit=0, split="test", n=1000, **f),
                                                 make_row("macs", macs, "MACs", exit=0, **f)]))
    points = tables.operating_points(frame_of(tmp_path / "four"), "macs").set_index("label")
    assert points["pareto"].to_dict() == {"a": True, "b": True, "c": False, "d": False}
    assert points["near_frontier"].to_dict() == {"a": False, "b": False, "c": True, "d": False}
    assert points.loc["c", "ci_high"] == pytest.approx(accuracy_interval(89.0, 1000)[1])
    assert 90.0 < points.loc["c", "ci_high"] < 91.0 and 89.8 < points.loc["d", "ci_high"] < 90.0
    assert set(points["selection"]) == {"fixed"} and points["n"].tolist() == [1000] * 4


def test_selection_labels(planted):
    assert tables.point_selection("policy", None, '{"fitted_on": "validation"}') == "validation"
    assert tables.point_selection("policy", 0.5, '{"fitted_on": "train"}') == "learned"  # an attribute-sweep value
    assert tables.point_selection("policy", None, "") == "learned"  # older rows of learned gates / router
    assert tables.point_selection("policy", 0.5, "") == "test grid"  # a threshold of unknown origin
    assert tables.point_selection("policy", 0.5, '{"fitted_on": "none (grid point)"}') == "test grid"
    assert tables.point_selection("static", None, "") == "fixed" == tables.point_selection("exit", None, "")
    points = tables.operating_points(planted, "macs")
    assert set(points.loc[points["source"] != "policy", "selection"]) == {"fixed"}  # forced exits, static models
    points = points[points["source"].isin(["policy", "static"])]
    assert dict(zip(points["label"], points["selection"])) == {
        "branchynet": "validation", "fractalbrainnet": "fixed", "moe": "learned", "resnet20": "fixed",
        "skipnet": "learned"}
    # an attribute-sweep value is a learned headline point; a chosen point only with its validation accuracy
    assert not is_chosen("alpha", 0.5, '{"fitted_on": "train"}') and is_chosen("gates", None, "")
    assert is_chosen("alpha", 0.5, '{"fitted_on": "train", "validation_top1": 68.4}')
    assert is_chosen("confidence@budget0.5", None, '{"fitted_on": "validation"}')
    assert not is_chosen("confidence", 0.5, '{"fitted_on": "none (grid point)"}') and not is_chosen("", None, "")


def test_forced_exits_remain_when_a_model_has_only_a_test_grid(tmp_path):
    frame = frame_of(build_run(tmp_path / "bn", models=("branchynet",), failed=False))
    frame = frame[frame["policy"] != "confidence@budget0.5"]
    points = tables.operating_points(frame, "macs")
    assert points[["source", "selection", "exit", "cost", "accuracy"]].values.tolist() == [
        ["exit", "fixed", 0, 10e6, 80.0], ["exit", "fixed", 1, 25e6, 89.0], ["exit", "fixed", 2, 40e6, 92.5]]
    assert len(tables.grid_points(frame, "macs")) == 6 and tables.chosen_points(frame).empty


def test_error_bars_are_the_points_intervals_in_their_models_colour(run_dir):
    for f in plots.tradeoff_figures(frame_of(run_dir)):
        colors = plots._palette(list(dict.fromkeys(f.points["label"])))
        bars = sorted(drawn_bars(f.figure))
        want = sorted(zip(f.points["cost"], f.points["ci_low"], f.points["ci_high"], f.points["label"]))
        assert len(bars) == len(want) == len(f.points) > 5, f.name  # every point has its interval bar
        for (x, lo, hi, rgb, width), (cost, ci_low, ci_high, label) in zip(bars, want):
            assert (x, lo, hi) == pytest.approx((cost, ci_low, ci_high))
            assert rgb == pytest.approx(to_rgb(colors[label])) and width == 0.8
        budget = f.points.set_index("policy").loc["confidence@budget0.5"]
        assert (budget["ci_low"], budget["ci_high"]) == pytest.approx(accuracy_interval(88.0, 1000))


def test_a_learned_attribute_point_with_the_best_validation_accuracy_is_the_chosen_point(tmp_path):
    """SkipNet's case: a gate-threshold budget fit (validation 35 %) and learned alpha points; the
    chosen point is the alpha point most accurate on validation, not the fit."""
    store = RunStore(tmp_path)
    store.write_meta("suite.json", {"name": "s", "path": "s.yaml", "digest": "d", "content": {"name": "s"}})
    store.write_meta("environment.json", {"cpu": "Test CPU", "git_commit": "x"})
    fields = {"run_id": "r", "suite": "s", "cell_id": "skipnet__c__cpu", "model": "skipnet", "variant": "skipnet38",
              "dataset": "c", "device": "cpu", "seed": 0}
    rows = [make_row("macs", 83e6, "MACs", exit=0, **fields), make_row("top1", 69.0, "%", exit=0, split="test",
                                                                       n=1000, **fields)]
    for policy, threshold, top1, macs, detail in (
            ("decision_threshold@budget0.5", None, 35.46, 40e6,
             {"fitted_on": "validation", "validation_top1": 35.1, "validation_expected_macs": 40e6}),
            ("alpha", 1.5, 68.35, 80e6, {"fitted_on": "train", "validation_top1": 69.0,
                                         "validation_expected_macs": 80e6}),
            ("alpha", 4.0, 53.04, 8.7e6, {"fitted_on": "train", "validation_top1": 52.0,
                                          "validation_expected_macs": 9e6})):
        rows.append(make_row("policy_top1", top1, "%", policy=policy, threshold=threshold, split="test", n=1000,
                             detail=detail, **fields))
        rows.append(make_row("expected_macs", macs, "MACs", policy=policy, threshold=threshold, split="test",
                             **fields))
    card = {"paper": "x", "notes": "", **CARDS["skipnet"], "reference": {"hrl_flops_reduction_pct_min": 30.0}}
    store.write_cell(CellRecord("skipnet__c__cpu", "ok", rows, meta={"model": "skipnet38", "card": card}))
    chosen = tables.chosen_points(frame_of(tmp_path))
    assert list(chosen["policy"]) == ["alpha"] and chosen["accuracy"].item() == 68.35
    # the paper's claim beside it: the cheapest learned point within 1 point of the full 69 % is alpha 1.5
    # (68.35 %), which avoids 1 - 80/83 of the MACs: 3.6 %, not the claimed 30 %
    from fractalbench.reports.claims import claims_table

    runs = tables.load_runs([tmp_path])
    claims = claims_table(runs, tables.combined_rows(runs))
    (claim,) = claims.to_dict("records")
    assert claim["point"] == "alpha 1.5" and claim["measured"] == pytest.approx(100 * (1 - 80 / 83))
    assert claim["published"] == 30.0 and claim["holds"] == "no" and claim["its top1 %"] == 68.35
