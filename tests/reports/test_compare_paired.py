"""Accuracy in `compare`: McNemar's exact test on paired per-sample outcomes, Newcombe's interval
when the samples are not paired, the fixed-points rule without n, and the Holm correction.

Hand values used below: a right/wrong vector of 10,000 samples with 90 % right; "b" = samples right
in the baseline and wrong in the candidate, "c" = the reverse. McNemar's one-sided p for "worse" is
P(X >= b), X ~ Binomial(b + c, 1/2): b = 100, c = 0 gives 2^-100; b = c = 100 gives
1/2 + C(200, 100) / 2^201 = 0.52817. The drop is 100 (b - c) / n points.
"""
import math
from pathlib import Path

import numpy as np
import pytest

from fractalbench.harness.outcomes import CellOutcomes, load_run_outcomes, outcomes_path
from fractalbench.harness.results import CellRecord, RunStore, make_row
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import parse_suite
from fractalbench.reports._compare_stats import newcombe_interval, paired_difference, two_proportion_z
from fractalbench.reports.compare import (
    IMPROVED,
    OK,
    REGRESSION,
    Thresholds,
    compare,
    compare_pair,
    holm,
    load_source,
    mcnemar_exact,
    write_baseline,
)

N = 10_000
CELL = "m__d__cpu"


# ----- the statistics on hand values ----------------------------------------------------------------

def test_mcnemar_exact_hand_values():
    assert mcnemar_exact(5, 0) == (pytest.approx(1 / 32), 1.0)
    assert mcnemar_exact(0, 5) == (1.0, pytest.approx(1 / 32))
    assert mcnemar_exact(2, 1) == (pytest.approx(4 / 8), pytest.approx(7 / 8))  # P(X>=2 | 3) = (3+1)/8
    assert mcnemar_exact(3, 3) == (pytest.approx(42 / 64), pytest.approx(42 / 64))  # (20+15+6+1)/64 > 1/2
    assert mcnemar_exact(100, 100)[0] == pytest.approx(0.5 + math.comb(200, 100) / 2**201)
    assert mcnemar_exact(100, 0)[0] == pytest.approx(2.0**-100, rel=1e-12)
    assert mcnemar_exact(0, 0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        mcnemar_exact(-1, 2)


def test_holm_hand_example():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 2 x 0.5 = 1, capped
    assert holm([0.004]) == [0.004] and holm([]) == []
    assert holm([1 / 128] * 10) == pytest.approx([10 / 128] * 10)


def test_newcombe_interval_matches_newcombe_1998_table_ii():
    """Method 10 (hybrid score) of Newcombe, Statistics in Medicine 17 (1998) 873-890, Table II."""
    published = {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090),
                 (6, 7, 2, 7): (0.0582, 0.8062), (5, 56, 0, 29): (-0.0381, 0.1926),
                 (0, 10, 0, 20): (-0.1611, 0.2775)}
    for (x1, n1, x2, n2), (low, high) in published.items():
        assert newcombe_interval(x1, n1, x2, n2) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_two_proportion_z_and_the_paired_interval_by_hand():
    # 48/80 against 56/70: q = 104/150, se = sqrt(q (1 - q) (1/70 + 1/80)) = 0.075467, z = -0.2 / se = -2.650
    low, high = two_proportion_z(56, 70, 48, 80)
    assert low == pytest.approx(0.004023, abs=2e-6) and high == pytest.approx(1 - 0.004023, abs=2e-6)
    assert two_proportion_z(10, 10, 20, 20) == (1.0, 1.0)  # all right on both sides: nothing to test
    # b = 3, c = 1 of n = 100: d = -2 points; Wilson 3/4 at 95 % = (0.30064, 0.95442), m = 4:
    # d in (4 (1 - 2 x 0.95442), 4 (1 - 2 x 0.30064)) = (-3.635, +1.595)
    d, lo, hi = paired_difference(3, 1, 100, 1.959963984540054)
    assert d == -2.0 and lo == pytest.approx(-3.6353, abs=1e-3) and hi == pytest.approx(1.5949, abs=1e-3)
    assert paired_difference(0, 0, 100, 2.0) == (0.0, 0.0, 0.0)


# ----- synthetic run directories (RunStore + CellOutcomes.save) ------------------------------------------

def labels_of(n: int = N) -> np.ndarray:
    return np.arange(n) % 10


def ninety(n: int = N) -> np.ndarray:
    right = np.zeros(n, dtype=bool)
    right[: n * 9 // 10] = True
    return right


def flipped(right: np.ndarray, lost: int, gained: int) -> np.ndarray:
    """``right`` with its first ``lost`` right samples made wrong and first ``gained`` wrong ones right."""
    out = right.copy()
    out[np.flatnonzero(right)[:lost]] = False
    out[np.flatnonzero(~right)[:gained]] = True
    return out


def write_run(path: Path, bits: dict[int, np.ndarray], *, labels: np.ndarray | None = None,
              outcomes: bool = True, values: dict[int, float] | None = None) -> Path:
    """One cell with a top1 row per exit (value = % right of its bits, n = its length) and, with
    ``outcomes``, the bits as per-sample outcomes; ``values`` overrides row values."""
    store = RunStore(path)
    path.mkdir(parents=True, exist_ok=True)
    store.write_meta("suite.json", {"name": "syn", "digest": "d1", "content": {"name": "syn"}})
    rows = [make_row("top1", (values or {}).get(k, 100.0 * float(b.mean())), "%", model="m", variant="m",
                     dataset="d", device="cpu", exit=k, split="test", n=b.size, cell_id=CELL)
            for k, b in bits.items()]
    store.write_cell(CellRecord(CELL, "ok", rows))
    if outcomes:
        cell = CellOutcomes(labels_of(next(iter(bits.values())).size) if labels is None else labels)
        for k, b in bits.items():
            cell.add("top1", b, exit=k)
        cell.save(outcomes_path(path, CELL))
    return path


def top1(result, exit: int = 0):
    return next(r for r in result.results if r.key["metric"] == "top1" and r.key["exit"] == exit)


def test_100_right_to_wrong_flips_of_10000_are_a_regression(tmp_path):
    right = ninety()
    base = write_run(tmp_path / "b", {0: right, 1: right})
    cand = write_run(tmp_path / "c", {0: flipped(right, 100, 0), 1: right})
    result = compare(base, cand)
    row = top1(result, 0)
    # a drop of exactly accuracy_points (1.0): the upper limit is exactly 1 point (Wilson of 100/100 is 1)
    assert row.status == REGRESSION and row.change == "-1.00 pts"
    assert "McNemar exact, b=100 c=0 of n=10000" in row.note and "Holm over 2 rows" in row.note
    assert row.p_value == pytest.approx(2 * 2.0**-100, rel=1e-9)  # Holm: the smaller of 2 p-values x 2
    assert top1(result, 1).status == OK and top1(result, 1).p_value == 1.0  # b = c = 0
    # before adjustment (the pair alone): p = 2^-100
    brow, crow = load_source(base).rows[0], load_source(cand).rows[0]
    alone = compare_pair(brow, crow, Thresholds(), (load_run_outcomes(base), load_run_outcomes(cand)))
    assert alone.status == REGRESSION and alone.p_value == pytest.approx(2.0**-100, rel=1e-9)
    # the same rows without outcomes (n = 10,000 each, 90 % -> 89 %): q = 0.895, se = 0.0043353,
    # z = -2.3066, p = 0.010538, x2 by Holm: the unpaired test cannot see this drop
    unpaired = top1(compare(load_source(base).rows, load_source(cand).rows), 0)
    assert unpaired.status == OK and unpaired.p_value == pytest.approx(2 * 0.010538, rel=1e-3)
    assert "Newcombe" in unpaired.note and "no per-sample outcomes in either side" in unpaired.note


def test_100_flips_each_way_are_not_a_regression(tmp_path):
    right = ninety()
    base = write_run(tmp_path / "b", {0: right})
    cand = write_run(tmp_path / "c", {0: flipped(right, 100, 100)})
    row = top1(compare(base, cand))
    assert row.status == OK and row.change == "+0.00 pts" and "b=100 c=100" in row.note
    assert row.p_value == pytest.approx(0.5 + math.comb(200, 100) / 2**201) and row.p_value > 0.5


def test_a_significant_drop_below_half_the_threshold_is_ok_with_a_note(tmp_path):
    right = ninety()
    base = write_run(tmp_path / "b", {0: right})
    cand = write_run(tmp_path / "c", {0: flipped(right, 40, 0)})  # -0.4 points, p = 2^-40, upper limit 0.4
    row = top1(compare(base, cand))
    assert row.status == OK and row.change == "-0.40 pts" and row.p_value == pytest.approx(2.0**-40)
    assert "significant drop below the threshold" in row.note
    assert top1(compare(base, cand, accuracy_points=0.5)).status == OK  # upper limit 0.4 < 0.5
    assert top1(compare(base, cand, accuracy_points=0.4)).status == REGRESSION  # 0.4 >= 0.4, 0.4 > 0.2


def test_100_wrong_to_right_flips_are_an_improvement(tmp_path):
    right = ninety()
    base = write_run(tmp_path / "b", {0: right})
    row = top1(compare(base, write_run(tmp_path / "c", {0: flipped(right, 0, 100)})))
    assert row.status == IMPROVED and row.change == "+1.00 pts" and row.p_value == pytest.approx(2.0**-100)


def test_different_test_samples_fall_back_to_the_interval_rule(tmp_path):
    right = ninety()
    base = write_run(tmp_path / "b", {0: right})
    other = np.roll(labels_of(), 1)  # same size, other labels in order: another sample set
    same = top1(compare(base, write_run(tmp_path / "c", {0: right}, labels=other)))
    assert same.status == OK and same.change == "+0.00 pts" and same.p_value == pytest.approx(0.5)  # z = 0
    assert "Newcombe interval + z-test, n=10000/10000, unpaired: the test samples differ" in same.note
    # the 100 flips that McNemar catches (previous tests) are missed unpaired (p = 0.010538 >= 0.01)
    worse = top1(compare(base, write_run(tmp_path / "w", {0: flipped(right, 100, 0)}, labels=other)))
    assert worse.status == OK and worse.p_value == pytest.approx(0.010538, rel=1e-3)
    # outcomes that do not match their row are not used either
    stale = top1(compare(base, write_run(tmp_path / "s", {0: right}, values={0: 89.0})))
    assert "do not match" in stale.note and "Newcombe" in stale.note


def test_interval_rule_needs_the_estimate_above_half_the_threshold():
    """5/20 right -> 0/20 right, no outcomes: pooled q = 5/40, se = sqrt(q (1 - q) 2 / 20) = 0.10458,
    z = -0.25 / se = -2.390, p = 0.00841. Drop 25 points; its upper limit (Newcombe, 99 % one-sided,
    Wilson of 5/20 at z = 2.3263 up to 0.51001, of 0/20 down to 0) is 25 + (51.001 - 25) = 51.00."""
    row = {"model": "m", "dataset": "d", "device": "cpu", "exit": 0, "split": "test", "metric": "top1", "n": 20}
    base, cand = [dict(row, value=25.0)], [dict(row, value=0.0)]

    def verdict(points):
        return compare(base, cand, accuracy_points=points).results[0]

    assert verdict(49).status == REGRESSION and verdict(49).p_value == pytest.approx(0.00841, abs=1e-5)
    assert "difference -51.00 to " in verdict(49).note and "n=20/20" in verdict(49).note
    # P = 50: the limit reaches 50 but the drop of 25 is not above 50 / 2
    assert verdict(50).status == OK and "significant drop below the threshold" in verdict(50).note
    assert verdict(52).status == OK  # the upper limit 51.00 does not reach 52


def test_rows_without_outcomes_and_n_use_the_fixed_points_rule():
    row = {"model": "m", "dataset": "d", "device": "cpu", "exit": 0, "split": "test", "metric": "top1"}
    result = compare([dict(row, value=91.2)], [dict(row, value=89.7)])
    assert result.results[0].status == REGRESSION and result.results[0].p_value is None
    assert result.results[0].note.startswith("fixed points (no n, no per-sample outcomes in either side)")
    assert "drop > 1 pts" in result.results[0].note
    assert compare([dict(row, value=91.2)], [dict(row, value=90.7)]).results[0].status == OK
    assert compare([dict(row, value=91.2)], [dict(row, value=92.7)]).results[0].status == IMPROVED


def test_holm_many_rows_at_raw_p_just_under_the_level_are_not_regressions(tmp_path):
    """10 exits, each b = 7, c = 0 of n = 100: raw p = 2^-7 = 0.0078 < 0.01 and a 7-point drop;
    Holm over the 10 rows makes every p 10/128 = 0.078: none is a regression."""
    right = ninety(100)
    base = write_run(tmp_path / "b", {k: right for k in range(10)})
    cand = write_run(tmp_path / "c", {k: flipped(right, 7, 0) for k in range(10)})
    result = compare(base, cand)
    rows = [top1(result, k) for k in range(10)]
    assert not result.has_regression and all(r.status == OK for r in rows)
    assert all(r.p_value == pytest.approx(10 / 128) and "Holm over 10 rows" in r.note for r in rows)
    # one such row alone is a regression at its raw p
    alone = compare(write_run(tmp_path / "b1", {0: right}), write_run(tmp_path / "c1", {0: flipped(right, 7, 0)}))
    assert top1(alone).status == REGRESSION and top1(alone).p_value == pytest.approx(1 / 128)


# ----- real run directories (fractalbench.harness.runner.run_suite) -----------------------------------

def tiny_suite(seed: int):
    raw = {"name": "t", "seed": seed, "datasets": [{"name": "digits", "image_size": 8}], "models": ["linear"],
           "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 3}, "metrics": ["accuracy"]}
    return parse_suite(raw, "t.yaml")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("paired_runs")
    for seed in (0, 1):
        assert run_suite(tiny_suite(seed), root / f"s{seed}").failed == []
    return root / "s0", root / "s1"


def test_real_runs_of_two_seeds_are_paired_and_counted_right(two_runs):
    base, cand = two_runs
    result = compare(base, cand)
    (bcell,), (ccell,) = load_run_outcomes(base).values(), load_run_outcomes(cand).values()
    assert bcell.digest == ccell.digest  # the splits do not move with the training seed
    acc = [r for r in result.results if r.kind == "accuracy"]
    assert sorted(r.key["metric"] for r in acc) == ["top1", "top5"]
    raw = []  # (p worse, p better) of each row from the outcome files, by hand
    for r in acc:
        bo, co = bcell.get(r.key["metric"], exit=0).correct, ccell.get(r.key["metric"], exit=0).correct
        b, c = int((bo & ~co).sum()), int((~bo & co).sum())
        assert f"McNemar exact, b={b} c={c} of n={bcell.n}; Holm over 2 rows" in r.note
        assert r.change == f"{r.candidate - r.baseline:+.2f} pts" == f"{100 * (c - b) / bcell.n:+.2f} pts"
        raw.append(mcnemar_exact(b, c))
    worse, better = holm([p[0] for p in raw]), holm([p[1] for p in raw])
    for r, w, bt in zip(acc, worse, better):
        assert r.p_value == pytest.approx(w if r.candidate <= r.baseline else bt)
    same = compare(base, base)
    assert all(r.p_value == 1.0 and "b=0 c=0" in r.note for r in same.results if r.kind == "accuracy")


def test_a_baseline_file_has_no_outcomes_so_the_interval_rule_applies(two_runs, tmp_path):
    base, cand = two_runs
    file = write_baseline(base, tmp_path / "bl.json")
    assert load_source(file).outcomes == {} and len(load_source(base).outcomes) == 1
    acc = [r for r in compare(file, cand).results if r.kind == "accuracy"]
    assert len(acc) == 2
    assert all("Newcombe" in r.note and "no per-sample outcomes in the baseline" in r.note for r in acc)
