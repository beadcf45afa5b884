"""Cost against sequence length through a suite: `cost.lengths` makes a sequence model's cell measure
each length beside full attention of its size, the report draws and tabulates the curves."""
import pytest

from fractalbench.baselines.sparse_attention import attention_macs
from fractalbench.harness.results import load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import SuiteError, parse_suite
from fractalbench.reports import tables
from fractalbench.reports.html import write_report


def _suite(**cost):
    return parse_suite({"name": "lengths", "datasets": [{"name": "synthetic", "image_size": 32, "num_samples": 8}],
                        "models": ["lra_bigbird", "resnet20"], "metrics": ["cost"],
                        "cost": {"oracle_samples": 0, **cost}}, "lengths.yaml")


def test_a_suite_with_lengths_measures_them_and_the_report_shows_the_saving(tmp_path):
    summary = run_suite(_suite(lengths=[128, 512]), tmp_path, progress=False)
    assert not summary.failed
    frame = load_run(tmp_path)
    rows = frame[frame.metric.isin(["macs_at_length", "latency_at_length", "memory_at_length"])]
    assert set(rows.model) == {"lra_bigbird"}  # resnet20 is no sequence model
    assert len(rows) == 3 * 2 * 2  # three metrics, two lengths, bigbird and full
    table = tables.length_scaling(tables.combined_rows(tables.load_runs([tmp_path])))
    at = table.set_index(["attention", "length"])
    # one layer; BigBird at 512 tokens (8 blocks of 64): its pattern's key blocks by the hand formula
    assert at.loc[("bigbird", 512), "attention MACs"] == attention_macs(512, 64, "bigbird", 64, random=3)
    assert at.loc[("full", 512), "attention MACs"] == 2 * 512 * 512 * 64
    saving = at.loc[("bigbird", 512), "MACs saving"]
    assert saving == pytest.approx(1 - at.loc[("bigbird", 512), "MACs"] / at.loc[("full", 512), "MACs"])
    assert 0 < saving < 1 and at.loc[("full", 512), "MACs saving"] != at.loc[("full", 512), "MACs saving"]  # NaN
    text = write_report([tmp_path]).read_text()
    assert ">Cost against sequence length<" in text and (tmp_path / "report" / "length_scaling.png").exists()


def test_lengths_must_be_whole_positive_numbers():
    with pytest.raises(SuiteError, match="lengths"):
        _suite(lengths=[0])
