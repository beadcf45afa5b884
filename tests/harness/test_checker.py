"""The contract checker: it passes on the registered dynamic models and fails, naming the broken
part, on deliberately broken models; `fractalbench check`; the dynamic part of `fractalbench profile`."""
import pytest
import torch
from cli_helpers import run_cli
from torch import nn

from fractalbench.harness import contract
from fractalbench.harness.checker import CHECK_NAMES, check_registered, choose_policy, run_checks, split_thresholds
from fractalbench.harness.contract import CostUnit, DynamicOutput, Trace, check_mode
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.metrics.profile import cost_profile
from fractalbench.harness.policies import ConfidencePolicy, DecisionThreshold, default_policy
from fractalbench.harness.registry import ModelCard, create_model, register_model, unregister_model


def cascade(cls=EarlyExitNetwork, exits=3, classes=5):
    """A small conv cascade on [N, 3, 8, 8] inputs (built with seed 0)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3 if k == 0 else 8, 8, 3, padding=1), nn.ReLU()) for k in range(exits)]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)) for _ in range(exits)]
    return cls(stages, heads).eval()


def batch(n=8):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class ComputesEverything(EarlyExitNetwork):
    """Broken: compact mode runs every stage and head on every sample, then selects each sample's
    exit (the earliest whose stateless policy says leave); its trace honestly counts every unit."""

    def dynamic_forward(self, x, policy=None, mode="compact"):
        check_mode(mode)
        policy, exits = policy or default_policy(), self.forward_exits(x)
        exit_index = torch.full((x.shape[0],), self.num_exits - 1)
        for k in reversed(range(self.num_exits - 1)):
            exit_index = torch.where(policy.decide(k, exits[k], {})[0], k, exit_index)
        logits = torch.stack(exits)[exit_index, torch.arange(x.shape[0])]
        everything = torch.full_like(exit_index, self.num_exits - 1)
        return DynamicOutput(logits, Trace(exit_index, self._one_hot_counts(everything)))


class CostUnitsMissAHead(EarlyExitNetwork):
    """Broken: the probe of every exit's cost unit skips head 0, so the table misses its MACs."""

    def cost_units(self):
        def probe(x, k):
            for j in range(k + 1):
                x = self.stages[j](x)
                if j > 0:
                    self.heads[j](x)
        return [CostUnit(f"exit_{k}", lambda x, k=k: probe(x, k)) for k in range(self.num_exits)]


class BatchMeanPolicy(ConfidencePolicy):
    """A sample leaves when its confidence is above the mean confidence of the batch in flight."""

    def decide(self, k, logits, state):
        conf = torch.softmax(logits.float(), -1).amax(-1)
        return conf > conf.mean(), state


class DecidesByBatchMean(EarlyExitNetwork):
    """Broken: its exit decision depends on the other samples of the batch (never leaves at batch 1)."""

    def dynamic_forward(self, x, policy=None, mode="compact"):
        return super().dynamic_forward(x, BatchMeanPolicy(thresholds=(0.0,)), mode)


def statuses(report):
    return {r.name: r.status for r in report.results}


def test_a_correct_cascade_passes_every_check():
    report = run_checks(cascade(), batch())
    assert [r.name for r in report.results] == list(CHECK_NAMES)
    assert report.ok and set(statuses(report).values()) == {"ok"}, report.text()
    assert "samples per exit" in report["decisions"].detail


@pytest.mark.parametrize("cls, broken, message", [
    (ComputesEverything, "real stopping", "stage 1 ran on 8 rows"),
    (CostUnitsMissAHead, "cost table vs counted", "counted"),
])
def test_broken_cascades_fail_the_check_of_the_broken_part_only(cls, broken, message):
    report = run_checks(cascade(cls), batch())
    assert report.failed == [broken], report.text()
    assert message in report[broken].detail
    assert report[broken].line().startswith(f"{broken}: FAIL: ")


def test_batch_dependent_decisions_fail_the_batch_check():
    report = run_checks(cascade(DecidesByBatchMean, exits=2), batch())
    assert report.failed == ["batch-1 vs batched"], report.text()
    assert "at batch 1" in report["batch-1 vs batched"].detail


def test_the_missing_head_is_the_difference_the_oracle_reports():
    model, x = cascade(CostUnitsMissAHead), batch()
    head0 = 8 * 5  # Linear(8, 5) at batch 1
    detail = run_checks(model, x)["cost table vs counted"].detail
    first = detail.split(";")[0]  # "sample i (exit k): counted C MACs at batch 1, the table T"
    counted, table = (int(part.split()[0].replace(",", "")) for part in first.split("counted ")[1].split("the table "))
    assert counted - table == head0


def test_thresholds_split_every_early_exit_in_the_widest_gap():
    conf = [torch.tensor([0.9, 0.2, 0.5, 0.8, 0.3, 0.6]), torch.tensor([0.1, 0.7, 0.4, 0.9, 0.2, 0.95]), torch.zeros(6)]
    thresholds, margin = split_thresholds(conf)
    # exit 0 may let 1..4 of 6 leave (2 must stay): widest gap 0.8 | 0.6; exit 1 of the 4 left: 0.7 | 0.4
    assert thresholds == pytest.approx((0.7, 0.55)) and margin == pytest.approx(0.1)
    remaining = torch.arange(6)
    for k, t in enumerate(thresholds):
        leave = conf[k][remaining] >= t
        assert 0 < int(leave.sum()) < len(remaining)
        remaining = remaining[~leave]
    with pytest.raises(ValueError, match="too few"):
        split_thresholds([torch.tensor([0.5, 0.6])] * 3)
    with pytest.raises(ValueError, match="tie"):
        split_thresholds([torch.full((4,), 0.5), torch.zeros(4)])


# ----- the registered dynamic models ---------------------------------------------------------------------

REGISTERED = ["branchynet_resnet20", "sdn:resnet20", "skipnet38", "moe_resnet20_top2", "fractalbrainnet_small_ee"]


@pytest.mark.parametrize("name", REGISTERED)
def test_the_registered_dynamic_models_pass(name):
    report = check_registered(name, input_size=16)
    assert report.ok, report.text()
    assert report["decisions"].status == "ok" and report["real stopping"].status == "ok"


def test_skipnet_is_checked_with_some_gates_closed():
    """At seed 0 every gate of an untrained SkipNet-38 is open on this batch (its probabilities sit a
    little above 0.5), so the checker forces a decision threshold, under which some gates close."""
    torch.manual_seed(0)
    model = create_model("skipnet38").eval()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert bool(contract.dynamic_forward(model, x).trace.gates.all())
        policy, text = choose_policy(model, x)
        gates = contract.dynamic_forward(model, x, policy).trace.gates.float()
    assert isinstance(policy, DecisionThreshold) and "decision_threshold" in text
    assert 0.2 <= float(gates.mean()) <= 0.8


# ----- the command line -----------------------------------------------------------------------------------

@pytest.fixture
def broken_registered():
    name = "test_broken_stopping"
    card = ModelCard(family="test", paper="none", dynamic_kind="early_exit", input_size=8)
    register_model(name, card=card)(lambda *, num_classes=10, in_chans=3: cascade(ComputesEverything,
                                                                                  classes=num_classes))
    yield name
    unregister_model(name)


def test_check_prints_one_line_per_check_and_exits_0_when_all_pass(capsys):
    code, out, err = run_cli(capsys, "check", "fractalbrainnet_small_ee", "--input-size", "16", "--batch-size", "6")
    lines = out.strip().splitlines()
    assert code == 0 and err == ""
    assert [line.split(":")[0] for line in lines] == list(CHECK_NAMES)
    assert all(line.split(": ", 1)[1].startswith("ok") for line in lines)
    assert lines[0] == "exit shapes: ok (3 exit(s), each [6, 10])" and "on input [6, 3, 16, 16]" in lines[1]


def test_check_exits_1_and_names_the_failure(capsys, broken_registered):
    code, out, _ = run_cli(capsys, "check", broken_registered)
    failed = [line for line in out.splitlines() if ": FAIL: " in line]
    assert code == 1 and len(failed) == 1 and failed[0].startswith("real stopping: FAIL: ")


@pytest.mark.parametrize("argv, message", [
    (["check", "nosuch_model"], "unknown model 'nosuch_model'"),
    (["check", "sdn:resnet20", "--batch-size", "3"], "batch size 3 is too small to check sdn:resnet20"),
    (["check", "resnet20", "--input-size", "0"], "must be >= 1, got 0"),
])
def test_check_bad_input_exits_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and message in err
    assert err.startswith("fractalbench: error: ") and len(err.strip().splitlines()) == 1


def test_profile_of_an_early_exit_model_shows_its_cost_table(capsys):
    """BranchyNet's forward() is the backbone without its side heads (40.55M MACs); a sample costs
    its exit's forced path, 14.60M to 59.43M."""
    code, out, _ = run_cli(capsys, "profile", "branchynet_resnet20")
    assert code == 0
    rows = cost_profile(create_model("branchynet_resnet20"), 32)
    exits = [r["macs"] for r in rows if r["part"] == "exit"]
    forward = [r["macs"] for r in rows if r["part"] == "forward"]
    assert forward == [40_551_040] and len(exits) == 3 and exits[0] < forward[0] < exits[2]
    assert exits[2] - forward[0] == sum(r["heads"] for r in rows if r["name"] == "exit 2") - 640  # the side heads
    assert {r["name"] for r in rows if r["part"] == "unit"} == {"exit_0", "exit_1", "exit_2"}
    assert "forward() (the module profile above) is one fixed path, 40.55M" in out
    assert "14.60M to 59.43M by the exit it takes" in out and "exit 2" in out


def test_profile_of_gated_and_routed_models_lists_their_units(capsys):
    skip = cost_profile(create_model("skipnet38"), 16)
    units = {r["name"]: r for r in skip if r["part"] == "unit"}
    assert len(units) == 18 and units["block_0"]["baseline"] == "base" and units["base"]["gates"] > 0
    assert not [r for r in skip if r["part"] == "forward"]  # forward() decides per sample
    moe = cost_profile(create_model("moe_resnet20_top2"), 16)
    experts = [r for r in moe if r["name"].startswith("layer")]
    assert len(experts) == 8 and all(r["macs"] == 2 * 4 * 64 * 64 for r in experts)  # per token: 2 r C^2
    assert cost_profile(create_model("resnet20"), 16) == []
    code, out, _ = run_cli(capsys, "profile", "skipnet38", "--input-size", "16")
    assert code == 0 and "block_16" in out and "forward() decides per sample" in out


class TwoScales(nn.Module):
    """A stage that keeps features at two scales (fine, coarse), as a multi-scale network does."""

    def __init__(self, first: bool):
        super().__init__()
        self.first = first
        self.fine = nn.Sequential(nn.Conv2d(3 if first else 4, 4, 3, padding=1), nn.ReLU())
        self.coarse = nn.Sequential(nn.Conv2d(4 if first else 8, 4, 3, stride=2 if first else 1, padding=1),
                                    nn.ReLU())

    def forward(self, x):
        if self.first:
            fine = self.fine(x)
            return [fine, self.coarse(fine)]
        fine, coarse = x
        fine = self.fine(fine)
        return [fine, self.coarse(torch.cat([coarse, nn.functional.avg_pool2d(fine, 2)], dim=1))]


def test_a_cascade_whose_stages_pass_several_scales_really_stops_and_passes_every_check():
    torch.manual_seed(0)
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)) for _ in range(3)]
    picked = [nn.Sequential(PickCoarse(), head) for head in heads]
    model = EarlyExitNetwork([TwoScales(True), TwoScales(False), TwoScales(False)], picked).eval()
    report = run_checks(model, batch())
    assert report.ok, report.text()
    assert "stage and head hooks saw only the samples still in flight" in report["real stopping"].detail
    policy = ConfidencePolicy(thresholds=(0.0,))  # everybody leaves at exit 0: later stages see no row
    out = contract.dynamic_forward(model, batch(), policy, "compact")
    assert out.trace.exit_index.tolist() == [0] * 8
    assert torch.allclose(out.logits, contract.forward_exits(model, batch())[0])


class PickCoarse(nn.Module):
    def forward(self, x):
        return x[-1]
