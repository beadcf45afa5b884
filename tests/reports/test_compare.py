"""Run comparison: latency statistics (injected slowdown flagged, same-build noise not),
accuracy on rows with n (interval rule; the paired rule is in test_compare_paired.py), exact
MACs/parameters, exit-histogram drift, thresholds, files and errors.

The fixture's accuracy rows have n = 1000 and no per-sample outcomes, so they are compared by the
interval rule (Newcombe + z-test). A 6-point drop of resnet20's top-1 (91.2 -> 85.2 %, n = 1000
each) has z-test p = 1.6e-5 and a drop upper limit of 9.37 points (99 % one-sided): a regression
for accuracy_points <= 9.37, not for 10. A 1.5-point drop (the old fixed rule's example) has
p = 0.127 on 1000 samples: noise, no longer a regression."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_run, latency_samples, model_rows

from fractalbench.harness.cli import main as cli_main
from fractalbench.reports.compare import (
    MACHINE_INDEPENDENT_METRICS,
    REGRESSION,
    Thresholds,
    compare,
    compare_main,
    compare_samples,
    exit_drift,
    write_baseline,
)


def rows(seed: int, models=("resnet20", "branchynet"), **options):
    rng = np.random.default_rng(seed)
    return [r for m in models for r in model_rows(m, rng, **options)]


def regressions(result, metric=None):
    return [r for r in result.regressions if metric is None or r.key["metric"] == metric]


# ----- latency -----------------------------------------------------------------------------------

def test_injected_20_percent_slowdown_is_flagged():
    result = compare(rows(1), rows(2, latency_factor=1.2))
    lat = [r for r in result.results if r.key["metric"] == "latency"]
    assert len(lat) == 7 and all(r.status == REGRESSION for r in lat), [(r.change, r.note) for r in lat]
    assert all(r.p_value < 1e-6 for r in lat)
    assert {r.key["metric"] for r in result.regressions} == {"latency"}  # nothing else changed


def test_injected_slowdown_detection_rate():
    rng = np.random.default_rng(7)
    hits = [compare_samples(latency_samples(rng, 1.0, 100), latency_samples(rng, 1.0, 100) * 1.2, 1.2, 0.01).regression
            for _ in range(100)]
    assert np.mean(hits) >= 0.95


def test_same_build_false_alarm_rate_is_below_5_percent():
    """200 pairs of runs of the same build (7 latency rows each, samples from the same noisy
    distribution): a pair counts as a false alarm when any of its latency rows is flagged."""
    alarms = [bool(regressions(compare(rows(2 * s), rows(2 * s + 1)), "latency")) for s in range(200)]
    rate = float(np.mean(alarms))
    print(f"false-alarm rate over 200 same-build pairs: {rate:.3f}")
    assert rate < 0.05


def test_small_slowdowns_and_speedups_are_not_regressions():
    result = compare(rows(1), rows(2, latency_factor=1.05))
    assert not regressions(result)
    result = compare(rows(1), rows(2, latency_factor=0.7))
    assert not regressions(result)
    assert all(r.status == "improved" for r in result.results if r.key["metric"] == "latency")


def test_without_samples_the_summary_statistics_are_tested():
    slow = compare(rows(1, samples=False), rows(2, samples=False, latency_factor=1.3))
    lat = [r for r in slow.results if r.key["metric"] == "latency"]
    assert lat and all(r.status == REGRESSION and r.note.startswith("z-test") for r in lat)
    same = [bool(regressions(compare(rows(s, samples=False), rows(s + 1000, samples=False)))) for s in range(50)]
    assert np.mean(same) < 0.05


def test_ratio_only_rule_without_samples_or_spread():
    base = [{"model": "m", "dataset": "d", "device": "cpu", "batch_size": 1, "exit": 0, "metric": "latency",
             "value": 10.0, "p50": 9.0}]
    cand = lambda p50: [dict(base[0], value=99.0, p50=p50)]  # noqa: E731 - p50 wins over the mean when both have it
    assert compare(base, cand(9.0 * 1.25)).has_regression
    assert not compare(base, cand(9.0 * 1.15)).has_regression
    assert compare(base, cand(9.0 * 1.25)).results[0].note.startswith("ratio only (p50)")


def test_memory_growth_beyond_ratio_fails():
    # fixture peaks: resnet20 3.2 MiB, branchynet 1.5 MiB (single numbers: the ratio-only rule)
    grown = regressions(compare(rows(1), rows(1, memory_factor=1.5)), "memory_peak_activations")
    assert sorted(r.key["model"] for r in grown) == ["branchynet", "resnet20"]
    assert not regressions(compare(rows(1), rows(1, memory_factor=1.1)))
    # x1.3 of 1.5 MiB is 0.45 MiB: below the 0.5 MiB floor; of 3.2 MiB it is 0.96 MiB
    assert [r.key["model"] for r in regressions(compare(rows(1), rows(1, memory_factor=1.3)))] == ["resnet20"]


# ----- accuracy, exact counts, exit drift, failures ----------------------------------------------------

def test_accuracy_drop_beyond_threshold_fails():
    bad = compare(rows(1), rows(1, top1_shift=-6.0))
    assert {r.key["metric"] for r in bad.regressions} == {"top1", "policy_top1"}
    assert len(bad.regressions) == 11  # 4 top1 + 7 policy_top1 rows; top5 did not move
    assert all(r.change == "-6.00 pts" for r in regressions(bad, "top1"))
    # 12 tested accuracy rows (resnet20 top1/top5, branchynet 3 top1 + 7 policy_top1) form the family
    assert all("Newcombe" in r.note and "n=1000/1000" in r.note and "Holm over 12 rows" in r.note
               for r in bad.regressions)
    assert not compare(rows(1), rows(1, top1_shift=-0.5)).has_regression
    assert not compare(rows(1), rows(1, top1_shift=+3.0)).has_regression
    better = compare(rows(1), rows(1, top1_shift=+6.0))
    assert {r.status for r in better.results if r.key["metric"] == "top1"} == {"improved"}


def test_a_small_drop_on_1000_samples_is_noise_now():
    """-1.5 points on n = 1000 (91.2 -> 89.7 %): pooled q = 0.9045, se = sqrt(q (1 - q) 2 / 1000)
    = 0.013144, z = -1.141, p = 0.1269 raw. The family is top1 and top5 (unchanged: z = 0, p = 0.5),
    so Holm doubles the smaller: 0.2538. The old fixed-points rule failed this pair; now it is ok."""
    result = compare(rows(1, models=("resnet20",)), rows(1, models=("resnet20",), top1_shift=-1.5))
    top1 = next(r for r in result.results if r.key["metric"] == "top1")
    assert top1.status == "ok" and top1.change == "-1.50 pts"
    assert top1.p_value == pytest.approx(2 * 0.12689, abs=1e-4)
    top5 = next(r for r in result.results if r.key["metric"] == "top5")
    assert top5.p_value == pytest.approx(0.5) and top5.status == "ok"
    assert not result.has_regression


def test_changed_mac_count_fails():
    result = compare(rows(1), rows(1, macs_delta=1))
    assert {r.key["metric"] for r in result.regressions} == {"macs", "flops"}
    assert regressions(result, "macs")[0].change == "+1"


def test_changed_parameter_count_fails():
    cand = rows(1)
    for r in cand:
        if r["metric"] == "params" and r["model"] == "resnet20":
            r["value"] += 10
    assert [r.key["model"] for r in regressions(compare(rows(1), cand), "params")] == ["resnet20"]


def test_exit_drift_chi_square_on_hand_counts():
    assert exit_drift([500, 300, 200], [500, 300, 200]) == pytest.approx(1.0)
    assert exit_drift([500, 300, 200], [400, 350, 250]) < 1e-4
    assert exit_drift([500, 300, 200], [480, 310, 210]) > 0.5
    assert exit_drift([1000, 0, 0], [1000, 0]) == 1.0  # one exit used: nothing to test


def test_exit_histogram_drift_is_detected():
    drifted = compare(rows(1), rows(1, exit_shift=0.05))
    hist = regressions(drifted, "exit histogram")
    assert hist and all(r.key["policy"] == "confidence" for r in hist)
    assert not regressions(compare(rows(1), rows(1, exit_shift=0.005)), "exit histogram")


def test_failed_candidate_cell_is_a_regression(tmp_path):
    base = build_run(tmp_path / "b", models=("resnet20",), failed=False)
    cand = build_run(tmp_path / "c", models=(), failed=True)
    result = compare(base, cand)
    failed = regressions(result, "error")
    assert failed and "out of memory" in failed[0].note
    assert any(r.status == "missing" and r.key["metric"] == "top1" for r in result.results)


def test_a_cell_on_one_side_only_is_one_line_of_the_changes_and_every_row_of_the_full_table():
    result = compare(rows(1), rows(1, models=("resnet20",)))
    missing = [r for r in result.results if r.status == "missing"]
    assert len(missing) > result.GROUP_ONE_SIDED and {r.key["model"] for r in missing} == {"branchynet"}
    notable = result.rows(notable_only=True)
    assert [r[1] for r in notable if r[0] == "missing"] == ["branchynet"]
    line = next(r for r in notable if r[0] == "missing")
    assert line[8].startswith(f"{len(missing)} rows: ") and line[-1] == "only in the baseline"
    assert sum(r[0] == "missing" for r in result.rows()) == len(missing)
    text = result.format_text()
    assert text.count("\nmissing ") == 1 and f"{len(missing)} rows:" in text
    assert f"{len(missing)} rows:" in result.to_markdown().split("<details>")[0]


# ----- thresholds -------------------------------------------------------------------------------

def test_thresholds_from_the_suite_compare_section_and_arguments(tmp_path):
    base = build_run(tmp_path / "b", models=("resnet20",), failed=False, seed=1)
    cand = build_run(tmp_path / "c", models=("resnet20",), failed=False, seed=1, top1_shift=-6.0,
                     compare={"accuracy_points": 10.0})
    assert not compare(base, cand).has_regression  # the suite allows 10 points (the upper limit is 9.37)
    assert compare(base, cand, accuracy_points=1.0).has_regression  # an argument overrides the suite
    assert compare(base, cand, Thresholds(accuracy_points=1.0)).thresholds.accuracy_points == 1.0
    with pytest.raises(ValueError, match="unknown compare threshold.*latency_ratio"):
        compare(base, cand, latency_ration=1.1)
    with pytest.raises(ValueError, match="p_value"):
        Thresholds(p_value=2)


# ----- files, paths and the command ----------------------------------------------------------------------

def test_baseline_file_round_trip(tmp_path):
    base = build_run(tmp_path / "base", seed=1)
    path = write_baseline(base, tmp_path / "baseline_smoke.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["suite"]["name"] == "smoke" and len(data["rows"]) > 50
    lat = next(r for r in data["rows"] if r["metric"] == "latency")
    assert len(json.loads(lat["detail"])["samples"]) == 100
    assert not compare(path, build_run(tmp_path / "same", seed=2)).has_regression
    assert regressions(compare(path, build_run(tmp_path / "slow", seed=3, latency_factor=1.25)), "latency")
    # a run's results.json has the same form
    assert not compare(base / "results.json", base).has_regression


def test_bad_paths_raise_clear_value_errors(tmp_path):
    run = build_run(tmp_path / "run", models=("resnet20",), failed=False)
    with pytest.raises(ValueError, match=r"baseline .*nope does not exist"):
        compare(tmp_path / "nope", run)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="candidate .* is not a fractalbench run directory"):
        compare(run, tmp_path / "plain")
    (tmp_path / "x.json").write_text('{"rows": 1}')
    with pytest.raises(ValueError, match="not a baseline JSON file"):
        compare(tmp_path / "x.json", run)
    (tmp_path / "v9.json").write_text('{"schema_version": 9, "rows": []}')
    with pytest.raises(ValueError, match="schema_version 9"):
        compare(tmp_path / "v9.json", run)


def test_compare_main_prints_writes_markdown_and_returns_exit_code(tmp_path, capsys):
    base = build_run(tmp_path / "b", models=("resnet20", "branchynet"), failed=False, seed=1)
    same = build_run(tmp_path / "s", models=("resnet20", "branchynet"), failed=False, seed=2)
    slow = build_run(tmp_path / "x", models=("resnet20", "branchynet"), failed=False, seed=3, latency_factor=1.3)
    assert compare_main(base, same) == 0
    assert "no regressions" in capsys.readouterr().out
    md = tmp_path / "cmp.md"
    assert compare_main(base, slow, md) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "Mann-Whitney U" in out and "7 regressions" in out
    text = md.read_text()
    assert "7 regression(s)" in text and "| REGRESSION |" in text and "<details>" in text
    assert cli_main(["compare", str(base), str(slow)]) == 1
    assert cli_main(["compare", str(base), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_writes_a_filtered_baseline_and_takes_thresholds(tmp_path, capsys):
    """`fractalbench baseline` / `compare` are the command lines (fractalbench.reports.compare has none of its own)."""
    import fractalbench.reports.compare

    assert not hasattr(fractalbench.reports.compare, "main")
    base = build_run(tmp_path / "b", models=("resnet20",), failed=False, seed=1)
    cand = build_run(tmp_path / "c", models=("resnet20",), failed=False, seed=2, top1_shift=-6.0)
    assert cli_main(["baseline", str(base), str(tmp_path / "bl.json"), "--metrics", "top1", "macs", "params"]) == 0
    kept = {r["metric"] for r in json.loads((tmp_path / "bl.json").read_text())["rows"]}
    assert kept == {"top1", "macs", "params"}
    assert cli_main(["compare", str(tmp_path / "bl.json"), str(cand)]) == 1
    assert cli_main(["compare", str(tmp_path / "bl.json"), str(cand), "--accuracy-points", "10"]) == 0
    assert cli_main(["compare", str(tmp_path / "nope.json"), str(cand)]) == 2


def test_example_ci_workflow_gates_on_the_compare_exit_code():
    import yaml

    path = Path(__file__).resolve().parents[2] / "examples" / "ci-workflow.yml"
    flow = yaml.safe_load(path.read_text())
    steps = flow["jobs"]["accuracy-and-cost"]["steps"]
    compare_step = next(s for s in steps if s.get("id") == "compare")
    assert "fractalbench compare benchmarks/gate_baseline runs/gate --markdown compare.md" in compare_step["run"]
    measure = next(s for s in steps if "fractalbench run benchmarks/gate.yaml" in s.get("run", ""))
    assert "Measure the trained checkpoint" in measure["name"]
    assert steps[-1]["if"] == "steps.compare.outputs.code != '0'" and "exit 1" in steps[-1]["run"]
    assert any("GITHUB_STEP_SUMMARY" in s.get("run", "") for s in steps)


# ----- `fractalbench compare` / `fractalbench baseline` on the command line ------------------------------

def cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``fractalbench ARGV`` run in this process."""
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse (--help)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_accuracy_points_overrides_the_suite_and_the_default(tmp_path, capsys):
    base = build_run(tmp_path / "b", models=("resnet20",), failed=False, seed=1)
    cand = build_run(tmp_path / "c", models=("resnet20",), failed=False, seed=1, top1_shift=-6.0)
    lenient = build_run(tmp_path / "l", models=("resnet20",), failed=False, seed=1, top1_shift=-6.0,
                        compare={"accuracy_points": 10.0})
    # a 6-point drop on 1000 samples, upper limit 9.37 points: fails 1 (default) and 9, passes 10
    code, out, _ = cli(capsys, "compare", base, cand)
    assert code == 1 and "REGRESSION" in out and "-6.00 pts" in out and "accuracy_points=1," in out
    assert cli(capsys, "compare", base, cand, "--accuracy-points", "10")[0] == 0
    assert cli(capsys, "compare", base, cand, "--accuracy-points", "9")[0] == 1
    assert cli(capsys, "compare", base, lenient)[0] == 0
    code, out, _ = cli(capsys, "compare", base, lenient, "--accuracy-points", "1")  # the option beats the suite
    assert code == 1 and "1 regression " in out


def test_cli_latency_memory_and_drift_thresholds(tmp_path, capsys):
    base = build_run(tmp_path / "b", models=("resnet20", "branchynet"), failed=False, seed=1)
    slow = build_run(tmp_path / "s", models=("resnet20", "branchynet"), failed=False, seed=2, latency_factor=1.3)
    # x1.3 on 7 latency rows (100 timings each): the upper confidence limit is 1.32-1.36, so a
    # threshold of 1.2 fails all 7 and one of 1.5 none (they are reported as "slower")
    code, out, _ = cli(capsys, "compare", base, slow)
    assert code == 1 and "7 regressions" in out
    code, out, _ = cli(capsys, "compare", base, slow, "--latency-ratio", "1.5")
    assert code == 0 and "7 slower" in out
    # memory peaks x1.5 (3.2 -> 4.8 and 1.5 -> 2.25 MiB; single numbers, ratio only)
    big = build_run(tmp_path / "m", models=("resnet20", "branchynet"), failed=False, seed=1, memory_factor=1.5)
    assert cli(capsys, "compare", base, big, "--latency-ratio", "3")[1].count("memory_peak_activations") == 2
    assert cli(capsys, "compare", base, big, "--latency-ratio", "3", "--memory-ratio", "1.4")[0] == 1
    assert cli(capsys, "compare", base, big, "--latency-ratio", "3", "--memory-ratio", "1.6")[0] == 0
    # exit histograms shifted by 0.05: chi-square p = 0.0033 and 0.00012 at thresholds 0.9 / 0.95
    one = build_run(tmp_path / "e0", models=("branchynet",), failed=False, seed=1)
    drift = build_run(tmp_path / "e1", models=("branchynet",), failed=False, seed=1, exit_shift=0.05)
    assert cli(capsys, "compare", one, drift)[1].count("exit histogram drifted") == 2
    assert cli(capsys, "compare", one, drift, "--exit-drift-p-value", "0.001")[1].count("exit histogram drifted") == 1
    assert cli(capsys, "compare", one, drift, "--exit-drift-p-value", "0.0001")[0] == 0


def test_cli_p_value_is_the_latency_test_level(tmp_path, capsys):
    """5 timings a side, x1.6 slower and fully separated: the one-sided Mann-Whitney p is its
    smallest possible value 1/C(10,5) = 1/252 = 0.0040, significant at 0.01, never at 0.001."""
    base = build_run(tmp_path / "b", models=("resnet20",), failed=False, seed=1, n_lat=5)
    slow = build_run(tmp_path / "s", models=("resnet20",), failed=False, seed=2, n_lat=5, latency_factor=1.6)
    code, out, _ = cli(capsys, "compare", base, slow)
    assert code == 1 and "2 regressions" in out and "0.004" in out
    code, out, _ = cli(capsys, "compare", base, slow, "--p-value", "0.001")
    assert code == 0 and "no regressions" in out


def test_cli_markdown_for_a_pull_request_comment(tmp_path, capsys):
    base = build_run(tmp_path / "b", models=("resnet20",), failed=False, seed=1)
    cand = build_run(tmp_path / "c", models=("resnet20",), failed=False, seed=1, top1_shift=-6.0, macs_delta=64)
    md = tmp_path / "comment" / "compare.md"
    assert cli(capsys, "compare", base, cand, "--markdown", md, "--accuracy-points", "0.5")[0] == 1
    text = md.read_text()
    assert ":x: **3 regression(s)**" in text  # top1 (-6 points, p 3e-5), macs and flops (+64, +128)
    assert "`accuracy_points=0.5`" in text and "| REGRESSION | resnet20 |" in text and "+64" in text
    assert cli(capsys, "compare", base, base, "--markdown", md)[0] == 0
    assert ":white_check_mark: **no regressions**" in md.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--latency-ratio", "0.5"], "argument --latency-ratio: compare threshold 'latency_ratio' must be >= 1"),
    (["--memory-ratio", "0.9"], "argument --memory-ratio: compare threshold 'memory_ratio' must be >= 1"),
    (["--p-value", "1.5"], "argument --p-value: compare threshold 'p_value' must be between 0 and 1"),
    (["--exit-drift-p-value", "0"], "must be between 0 and 1"),
    (["--accuracy-points", "-1"], "argument --accuracy-points: compare threshold 'accuracy_points' must be >= 0"),
    (["--accuracy-points", "two"], "argument --accuracy-points: 'two' is not a number"),
    (["--latency-ratio", "nan"], "argument --latency-ratio: must be a finite number, got 'nan'"),
    (["--accuracy-pts", "1"], "unrecognized arguments: --accuracy-pts 1"),
])
def test_cli_bad_thresholds_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    run = build_run(tmp_path / "r", models=("resnet20",), failed=False)
    code, out, err = cli(capsys, "compare", run, run, *argv)
    assert code == 2 and out == ""
    assert err.startswith("fractalbench: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_bad_compare_paths_exit_2(tmp_path, capsys):
    run = build_run(tmp_path / "r", models=("resnet20",), failed=False)
    for argv, message in [((run, tmp_path / "nope"), "candidate " + str(tmp_path / "nope") + " does not exist"),
                          ((tmp_path, run), "is not a fractalbench run directory"),
                          ((run, run, "--markdown", tmp_path), "is a directory"),
                          ((run,), "the following arguments are required: candidate")]:
        code, _, err = cli(capsys, "compare", *argv)
        assert code == 2 and err.startswith("fractalbench: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_cli_baseline_keeps_machine_independent_metrics_by_default(tmp_path, capsys):
    run = build_run(tmp_path / "smoke", seed=1)
    out_file = tmp_path / "benchmarks" / "baseline_smoke.json"
    code, out, _ = cli(capsys, "baseline", run, out_file)
    assert code == 0 and f"baseline: {out_file}" in out
    data = json.loads(out_file.read_text())
    metrics = {r["metric"] for r in data["rows"]}
    assert metrics == {"top1", "top5", "policy_top1", "params", "params_active", "macs", "flops", "exit_fraction",
                       "error"}
    assert data["suite"]["name"] == "smoke" and data["environment"]["git_commit"] == "deadbeef"
    # the 18 exit_fraction rows of branchynet keep their counts for the chi-square test
    counts = [json.loads(r["detail"])["count"] for r in data["rows"] if r["metric"] == "exit_fraction"]
    assert len(counts) == 18 and sum(counts) == 6 * 1000
    assert set(data["metrics"]) == MACHINE_INDEPENDENT_METRICS  # what was kept, recorded for compare
    # gating another machine's run: 3x slower timings are not compared (nor listed as new), an accuracy drop is
    result = compare(out_file, build_run(tmp_path / "slow", seed=2, latency_factor=3.0))
    assert result.counts() == {"ok": 42, "info": 1}  # info: the "broken" cell failed in both; no new/missing rows
    assert any("candidate rows of other metrics are not compared" in w for w in result.warnings)
    assert cli(capsys, "compare", out_file, tmp_path / "slow")[0] == 0
    # with the filter, a cell failing only in the candidate is still a regression, a new model still new
    clean = tmp_path / "clean.json"
    ok_run = build_run(tmp_path / "ok", seed=1, models=("resnet20",), failed=False)
    assert cli(capsys, "baseline", ok_run, clean)[0] == 0
    failing = compare(clean, build_run(tmp_path / "failing", seed=1, models=("resnet20", "moe"), error_text="boom"))
    assert [(r.key["model"], r.note) for r in failing.regressions] == [("broken", "candidate cell failed: boom")]
    assert {r.key["model"] for r in failing.results if r.status == "new"} == {"moe"}
    code, out, _ = cli(capsys, "compare", out_file, build_run(tmp_path / "worse", seed=2, top1_shift=-6.0))
    assert code == 1 and "-6.00 pts" in out
    # a changed MAC count fails exactly
    assert cli(capsys, "compare", out_file, build_run(tmp_path / "macs", seed=1, macs_delta=1))[0] == 1


def test_cli_baseline_metrics_option(tmp_path, capsys):
    run = build_run(tmp_path / "smoke", models=("resnet20",), failed=False, seed=1)
    assert cli(capsys, "baseline", run, tmp_path / "all.json", "--metrics", "all")[0] == 0
    rows = json.loads((tmp_path / "all.json").read_text())["rows"]
    assert {"latency", "memory_peak_activations", "train_seconds"} <= {r["metric"] for r in rows}
    assert len(json.loads(next(r for r in rows if r["metric"] == "latency")["detail"])["samples"]) == 100
    assert cli(capsys, "baseline", run, tmp_path / "two.json", "--metrics", "top1", "latency")[0] == 0
    assert {r["metric"] for r in json.loads((tmp_path / "two.json").read_text())["rows"]} == {"top1", "latency"}
    code, _, err = cli(capsys, "baseline", run, tmp_path / "x.json", "--metrics", "topp1")
    assert code == 2 and "has no rows of metric(s) topp1; it has: " in err and "top1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()
    code, _, err = cli(capsys, "baseline", tmp_path / "nope", tmp_path / "x.json")
    assert code == 2 and "is not a fractalbench run directory" in err
    code, _, err = cli(capsys, "baseline", run, tmp_path)
    assert code == 2 and "is a directory" in err


def test_compare_exit_codes_in_a_real_process(tmp_path):
    import subprocess
    import sys

    base = build_run(tmp_path / "b", models=("resnet20",), failed=False, seed=1)
    cand = build_run(tmp_path / "c", models=("resnet20",), failed=False, seed=1, top1_shift=-6.0)
    repo = Path(__file__).resolve().parents[2]

    def run(*a):
        return subprocess.run([sys.executable, "-m", "fractalbench", "compare", *map(str, a)], cwd=repo,
                              capture_output=True, text=True, timeout=120)

    assert run(base, cand).returncode == 1
    assert run(base, cand, "--accuracy-points", "10").returncode == 0
    bad = run(base, cand, "--p-value", "2")
    assert bad.returncode == 2 and bad.stderr.startswith("fractalbench: error: argument --p-value") and bad.stdout == ""


# ----- a gate without holes (issue 24) ------------------------------------------------------------

def test_a_model_missing_from_the_candidate_fails_unless_allowed(capsys):
    """The finding: a model that silently dropped out of the candidate run was "missing", exit 0."""
    result = compare(rows(1), rows(1, models=("resnet20",)))
    (cell,) = [r for r in result.regressions if r.key["metric"] == "cell"]
    assert cell.key["model"] == "branchynet" and "the candidate has no row of it" in cell.note
    assert result.regressions == [cell]
    allowed = compare(rows(1), rows(1, models=("resnet20",)), allow_missing=True)
    assert not allowed.has_regression
    assert any(r.key["metric"] == "cell" and r.status == "missing" for r in allowed.results)
    assert compare_main(rows(1), rows(1, models=("resnet20",)), stream=sys.stdout) == 1
    assert compare_main(rows(1), rows(1, models=("resnet20",)), stream=sys.stdout, allow_missing=True) == 0


def test_exit_drift_toward_cheaper_exits_without_accuracy_loss_is_changed_not_a_regression():
    """The finding: a histogram that moved toward earlier (cheaper) exits was a REGRESSION."""
    cheaper = compare(rows(1), rows(1, exit_shift=-0.05, top1_shift=1.0))
    hist = [r for r in cheaper.results if r.key["metric"] == "exit histogram" and r.p_value is not None
            and r.p_value < 0.01]
    assert hist and all(r.status == "changed" for r in hist), [(r.status, r.note) for r in hist]
    assert not regressions(cheaper)
    # toward cheaper exits but less accurate: the candidate pays for it
    lossy = compare(rows(1), rows(1, exit_shift=-0.05))
    assert {r.status for r in lossy.results if r.key["metric"] == "exit histogram" and r.p_value is not None
            and r.p_value < 0.01} == {REGRESSION}
    assert all("accuracy dropped" in r.note for r in regressions(lossy, "exit histogram"))
    # toward costlier exits: expected MACs rose
    costlier = regressions(compare(rows(1), rows(1, exit_shift=0.05, top1_shift=1.0)), "exit histogram")
    assert costlier and all("expected MACs rose" in r.note for r in costlier)


def test_latency_rule_as_the_readme_states_it():
    """README: a regression needs p < p-value, an upper limit reaching the ratio and an estimate above
    halfway to it; so x1.143 with an upper limit of x1.25 fails at ratio 1.2, x1.05 passes as
    "slower" when significant, and a true x1.2 fails."""
    from fractalbench.reports.compare import compare_summaries

    mid = compare_summaries((10.0, 1.0, 200), (11.43, 1.0, 200), 1.2, 0.01)
    assert 1.1 < mid.ratio < 1.2 and mid.ratio_high < 1.2 and not mid.regression and mid.significant
    wide = compare_summaries((10.0, 4.0, 30), (11.43, 4.0, 30), 1.2, 0.3)
    assert wide.ratio_high >= 1.2 and wide.p < 0.3 and wide.regression
    small = compare_summaries((10.0, 0.5, 400), (10.5, 0.5, 400), 1.2, 0.01)
    assert small.significant and not small.regression
    true = compare_summaries((10.0, 1.0, 200), (12.0, 1.0, 200), 1.2, 0.01)
    assert true.regression
