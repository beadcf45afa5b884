"""Oracle exit, overthinking and per-exit calibration: hand-computed cases, then one real cell whose rows
agree with its stored per-sample outcomes, then the report section with its reliability diagrams."""
from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fractalbench.harness.metrics.exit_stats import (
    ECE_BINS,
    bin_index,
    calibration,
    correct_matrix,
    earliest_right_exit,
    exit_stat_rows,
    oracle,
    overthinking,
)
from fractalbench.harness.outcomes import load_outcomes
from fractalbench.harness.results import load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.stats import accuracy_interval
from fractalbench.harness.suites import parse_suite

PNG = b"\x89PNG\r\n\x1a\n"

# 3 exits x 4 samples, 3 classes. Labels 0 1 2 0; predictions per exit (one-hot logits):
#   exit 0: 0 0 0 1 -> right: sample 0
#   exit 1: 0 1 0 2 -> right: samples 0, 1
#   exit 2: 0 2 2 1 -> right: samples 0, 2
# Earliest right exit: 0, 1, 2, none. Oracle: 3 of 4 right = 75 %; with exit MACs 100, 250, 400 the
# oracle cost is (100 + 250 + 400 + 400) / 4 = 287.5 (sample 3 runs to the last exit).
# Destructive overthinking: sample 1 (right at exit 1, wrong at the last) = 25 %; wasteful: sample 0 = 25 %.
LABELS = torch.tensor([0, 1, 2, 0])
PREDICTIONS = ([0, 0, 0, 1], [0, 1, 0, 2], [0, 2, 2, 1])
EXIT_MACS = (100, 250, 400)


def one_hot_logits() -> list[torch.Tensor]:
    return [3.0 * F.one_hot(torch.tensor(p), 3).float() for p in PREDICTIONS]


def two_class_logits(confidences, predicted=0) -> torch.Tensor:
    """Logits whose softmax gives ``confidences`` to class ``predicted`` (of 2)."""
    p = torch.tensor(confidences, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)
    return logits if predicted == 0 else logits.flip(1)


def test_oracle_and_overthinking_by_hand():
    correct = correct_matrix(one_hot_logits(), LABELS)
    np.testing.assert_array_equal(correct, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(earliest_right_exit(correct), [0, 1, 2, -1])
    orc = oracle(correct, EXIT_MACS)
    assert (orc.right, orc.n, orc.accuracy, orc.macs) == (3, 4, 75.0, 287.5)
    over = overthinking(correct)
    assert (over.destructive, over.wasteful, over.n) == (1, 1, 4)
    assert over.destructive_percent == over.wasteful_percent == 25.0
    with pytest.raises(ValueError, match="3 exits but 2 exit costs"):
        oracle(correct, EXIT_MACS[:2])
    with pytest.raises(ValueError, match="at least two exits"):
        overthinking(correct[:1])


def test_ece_by_hand_with_its_reliability_bins():
    """Bins of width 1/15. Confidences (class 0 predicted) and labels:
    0.9 right, 0.9 wrong -> bin 13 [13/15, 14/15): acc 0.5, conf 0.9, |gap| 0.4, weight 2/5 -> 0.16
    0.62 right           -> bin 9 [9/15, 10/15):   acc 1,   conf 0.62, gap 0.38, weight 1/5 -> 0.076
    0.55 wrong           -> bin 8 [8/15, 9/15):    acc 0,   conf 0.55, gap 0.55, weight 1/5 -> 0.11
    1.0 right            -> bin 14 (closed at 1):  acc 1,   conf 1,    gap 0 -> 0
    ECE = 0.346 = 34.6 %."""
    logits = two_class_logits([0.9, 0.9, 0.62, 0.55, 0.5])
    logits[4] = torch.tensor([50.0, -50.0], dtype=torch.float64)  # softmax 1 - 3.7e-44 = 1.0 in float64
    labels = torch.tensor([0, 1, 0, 1, 0])
    cal = calibration(logits, labels)
    assert cal.ece == pytest.approx(34.6, abs=1e-9) and cal.n == 5 and len(cal.bins) == ECE_BINS == 15
    counts = {m: b.count for m, b in enumerate(cal.bins) if b.count}
    assert counts == {8: 1, 9: 1, 13: 2, 14: 1}
    b13 = cal.bins[13]
    assert (b13.lower, b13.upper) == pytest.approx((13 / 15, 14 / 15))
    assert (b13.confidence, b13.accuracy) == pytest.approx((0.9, 0.5))
    assert (cal.bins[14].confidence, cal.bins[14].accuracy, cal.bins[14].upper) == (1.0, 1.0, 1.0)
    assert cal.bins[0].count == 0 and cal.bins[0].confidence is None and cal.bins[0].accuracy is None


def test_a_confidence_of_one_is_in_the_last_bin_and_every_lower_edge_in_its_own():
    wrong_and_sure = calibration(torch.tensor([[50.0, -50.0]]), torch.tensor([1]))
    assert wrong_and_sure.ece == 100.0 and wrong_and_sure.bins[-1].count == 1
    edges = np.linspace(0.0, 1.0, 16)
    np.testing.assert_array_equal(bin_index(edges), [*range(15), 14])
    np.testing.assert_array_equal(bin_index(edges[1:-1] - 1e-12), range(14))


def test_rows_carry_values_intervals_and_details():
    rows = exit_stat_rows(one_hot_logits(), LABELS, EXIT_MACS, model="m", cell_id="c")
    by = {(r["metric"], r["exit"]): r for r in rows}
    assert set(by) == {("oracle_top1", None), ("oracle_macs", None), ("overthinking", None),
                       ("overthinking_wasteful", None), ("ece", 0), ("ece", 1), ("ece", 2)}
    orc = by[("oracle_top1", None)]
    assert (orc["value"], orc["n"], orc["split"], orc["model"]) == (75.0, 4, "test", "m")
    assert (orc["ci_low"], orc["ci_high"]) == pytest.approx(accuracy_interval(75.0, 4))
    assert (orc["ci_low"], orc["ci_high"]) == pytest.approx((30.06, 95.44), abs=0.01)  # Wilson, 3 of 4
    macs = json.loads(by[("oracle_macs", None)]["detail"])
    assert by[("oracle_macs", None)]["value"] == 287.5
    assert macs["oracle_exit_counts"] == [1, 1, 1] and macs["right_nowhere"] == 1
    assert macs["fraction_of_last_exit"] == 287.5 / 400
    assert by[("overthinking", None)]["value"] == by[("overthinking_wasteful", None)]["value"] == 25.0
    # one-hot logits x 3 over 3 classes: confidence e^3 / (e^3 + 2) = 0.9094 for every sample (bin 13)
    conf = math.exp(3) / (math.exp(3) + 2)
    for k, right in enumerate((1, 2, 2)):
        detail = json.loads(by[("ece", k)]["detail"])
        assert detail["bins"] == 15 and detail["reliability"][13]["count"] == 4
        assert by[("ece", k)]["value"] == pytest.approx(100 * abs(right / 4 - conf))


def test_a_single_exit_gets_only_its_ece_and_costs_must_match_the_exits():
    rows = exit_stat_rows(one_hot_logits()[:1], LABELS, EXIT_MACS[:1])
    assert [(r["metric"], r["exit"]) for r in rows] == [("ece", 0)]
    with pytest.raises(ValueError, match="3 exits but 2 exit costs"):
        exit_stat_rows(one_hot_logits(), LABELS, EXIT_MACS[:2])


# ----- one real cell ------------------------------------------------------------------------------

MODEL = "branchynet_resnet20"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": [MODEL, "linear"],
           "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 3}, "metrics": ["accuracy"]}
    path = tmp_path_factory.mktemp("exit_stats")
    summary = run_suite(parse_suite(raw, "t.yaml"), path)
    assert summary.failed == []
    return path


def _model_rows(run_dir, model):
    frame = load_run(run_dir)
    return frame[frame.model == model]


def test_oracle_rows_agree_with_the_stored_per_sample_outcomes(run_dir):
    rows = _model_rows(run_dir, MODEL)
    outcomes = load_outcomes(run_dir, rows.cell_id.iloc[0])
    top1 = rows[(rows.metric == "top1") & (rows.split == "test")].sort_values("exit")
    exits = top1.exit.astype(int).tolist()
    assert len(exits) >= 2
    bits = np.stack([outcomes.get("top1", exit=k).correct for k in exits])
    value = {m: rows[rows.metric == m].iloc[0] for m in ("oracle_top1", "oracle_macs", "overthinking",
                                                          "overthinking_wasteful")}
    orc = value["oracle_top1"]
    assert orc.n == outcomes.n and orc.value >= top1.value.max()
    assert orc.value == pytest.approx(100 * bits.any(axis=0).mean(), abs=1e-9)
    assert orc.value == pytest.approx(top1.value.iloc[-1] + value["overthinking"].value, abs=1e-9)
    assert (orc.ci_low, orc.ci_high) == pytest.approx(accuracy_interval(orc.value, int(orc.n)))
    wasteful = bits[:-1].any(axis=0) & bits[-1]
    assert value["overthinking_wasteful"].value == pytest.approx(100 * wasteful.mean(), abs=1e-9)
    macs = json.loads(value["oracle_macs"].detail)["exit_macs"]
    assert len(macs) == len(exits) and all(a < b for a, b in zip(macs, macs[1:]))
    leaves = np.where(bits.any(axis=0), bits.argmax(axis=0), len(exits) - 1)
    assert value["oracle_macs"].value == pytest.approx(np.asarray(macs)[leaves].mean())


def test_every_exit_of_every_model_has_fifteen_bins_summing_to_n(run_dir):
    for model, num_exits in ((MODEL, None), ("linear", 1)):
        rows = _model_rows(run_dir, model)
        top1 = rows[(rows.metric == "top1") & (rows.split == "test")].set_index("exit")
        ece = rows[rows.metric == "ece"]
        assert sorted(ece.exit.astype(int)) == sorted(top1.index.astype(int))
        assert num_exits is None or len(ece) == num_exits
        for row in ece.itertuples():
            detail = json.loads(row.detail)
            bins = detail["reliability"]
            assert detail["bins"] == len(bins) == 15 and sum(b["count"] for b in bins) == row.n
            right = sum(b["count"] * b["accuracy"] for b in bins if b["count"])
            assert 100 * right / row.n == pytest.approx(top1.loc[row.exit, "value"], abs=1e-9)
    assert not (_model_rows(run_dir, "linear").metric == "oracle_top1").any()


def test_report_has_the_section_and_a_reliability_diagram_per_model(run_dir):
    from fractalbench.reports.html import page_sections, write_report

    anchors = [spec[0] for spec in page_sections()]
    assert anchors.index("exit_stats") == anchors.index("dynamic") + 1
    text = write_report(run_dir).read_text()
    found = dict(re.findall(r'<section id="([^"]*)" class="[^"]*">(.*?)</section>', text, re.DOTALL))
    inner = found["exit_stats"]
    assert "<h2>Exits: oracle, overthinking, calibration</h2>" in inner
    assert "oracle top1 %" in inner and "ECE %" in inner
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="Reliability per exit: ([^"]+)"', inner)
    assert sorted(alt.split(" (")[0] for _, alt in images) == sorted([MODEL, "linear"])
    folder = run_dir / "report"
    for data, alt in images:
        files = list(folder.glob(f"reliability__{alt.split(' (')[0]}__*.png"))
        assert len(files) == 1 and base64.b64decode(data) == files[0].read_bytes()
        assert files[0].read_bytes().startswith(PNG)
