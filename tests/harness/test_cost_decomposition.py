"""Cost, decomposed: backbone, exit heads and gates/routers of every operating point, and the share
of the full network avoided. Hand-computed on a cascade of Linear layers (a Linear costs in x out
MACs), then on the real baselines, where the table x trace split must equal the split of MACs
counted on the real dynamic forward (an independent path) and add up to ``expected_macs``."""
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from fractalbench.harness import contract
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.metrics import MacCounter, build_cost_table
from fractalbench.harness.metrics.flops import ROLE_PARTS, decomposition_rows, expected_cost_rows, expected_roles
from fractalbench.harness.policies import ExitPolicy
from fractalbench.harness.registry import create_model

PARTS = ("expected_macs_backbone", "expected_macs_heads", "expected_macs_gating")


class PlannedExits(ExitPolicy):
    """Sample n leaves at exit ``plan[n]``: the plan rides in the policy state, which the cascade
    compacts with the batch, so each sample keeps its own entry."""

    name = "planned"

    def __init__(self, plan: list[int]) -> None:
        self.plan = torch.tensor(plan)

    def init_state(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"plan": self.plan[:n].to(device)}

    def decide(self, k: int, logits: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        return state["plan"] == k, state


def linear_cascade() -> EarlyExitNetwork:
    """Stages 8->6->4->4 and heads 6->3, 4->3, 4->3: MACs 48, 24, 16 and 18, 12, 12."""
    torch.manual_seed(0)
    stages = [nn.Linear(8, 6), nn.Linear(6, 4), nn.Linear(4, 4)]
    heads = [nn.Linear(6, 3), nn.Linear(4, 3), nn.Linear(4, 3)]
    return EarlyExitNetwork(stages, heads).eval()


def by_metric(rows: list[dict]) -> dict[str, dict]:
    return {r["metric"]: r for r in rows}


def counted_roles(model: nn.Module, x: torch.Tensor, table, run) -> dict[str, float]:
    """The independent path: count ``run(x)`` (a real forward at batch 1) and split it by role."""
    with torch.no_grad(), MacCounter(model) as counter:
        run(x)
    return {k: float(v) for k, v in table.roles_of(counter.result()).items()}


def table_roles(trace: contract.Trace, table) -> dict[str, float]:
    return {k: float(v[0]) for k, v in expected_roles(trace, table).items()}


def parts_add_up(rows: list[dict]) -> None:
    """The three parts add up to expected_macs: exactly over samples, and the means too here."""
    m = by_metric(rows)
    sums = [json.loads(m[p]["detail"])["sum_over_samples"] for p in PARTS]
    assert sum(sums) == m["expected_macs"]["value"] * m["expected_macs"]["n"]
    assert sum(m[p]["value"] for p in PARTS) == m["expected_macs"]["value"]


# ----- hand-computed: a cascade of Linear layers ------------------------------------------------------

def test_linear_cascade_table_by_role_by_hand():
    table = build_cost_table(linear_cascade(), torch.randn(1, 8))
    assert table.exits == (66, 102, 130)  # 48+18, +24+12, +16+12
    assert table.unit_roles == {"exit_0": {"backbone": 48, "heads": 18, "gates": 0, "routers": 0},
                                "exit_1": {"backbone": 72, "heads": 30, "gates": 0, "routers": 0},
                                "exit_2": {"backbone": 88, "heads": 42, "gates": 0, "routers": 0}}
    assert table.exit_roles[-1] == table.unit_roles["exit_2"]
    assert table.forward_count.total == 88 + 12  # forward(): every stage, the last head only


def test_samples_exiting_at_different_exits_by_hand():
    model = linear_cascade()
    table = build_cost_table(model, torch.randn(1, 8))
    plan = [0, 1, 2, 2]
    out = contract.dynamic_forward(model, torch.randn(4, 8), PlannedExits(plan))
    assert out.trace.exit_index.tolist() == plan
    rows = by_metric(expected_cost_rows(out.trace, table, "planned", model="tiny"))
    assert rows["expected_macs"]["value"] == (66 + 102 + 130 + 130) / 4 == 107
    assert rows["expected_macs_backbone"]["value"] == (48 + 72 + 88 + 88) / 4 == 74
    # the sample at exit 2 evaluated heads 0, 1 and 2 (18 + 12 + 12), the one at exit 1 heads 0 and 1
    assert rows["expected_macs_heads"]["value"] == (18 + 30 + 42 + 42) / 4 == 33
    assert rows["expected_macs_gating"]["value"] == 0
    avoided = rows["macs_avoided_fraction"]
    assert avoided["value"] == pytest.approx(1 - 107 / 130, abs=1e-15) and avoided["unit"] == "fraction"
    detail = json.loads(avoided["detail"])
    assert detail["full_network_macs"] == 130 and detail["forward_macs"] == 100
    assert detail["avoided_vs_forward"] == pytest.approx(1 - 107 / 100)  # side heads cost more than is saved
    assert avoided["policy"] == "planned" and avoided["n"] == 4 and avoided["model"] == "tiny"
    parts_add_up(list(rows.values()))


def test_per_sample_split_equals_the_split_counted_on_the_real_path():
    model = linear_cascade()
    table = build_cost_table(model, torch.randn(1, 8))
    x = torch.randn(3, 8)
    for k in range(3):
        policy = PlannedExits([k])
        trace = contract.dynamic_forward(model, x[k:k + 1], policy).trace
        assert table_roles(trace, table) == counted_roles(model, x[k:k + 1], table,
                                                          lambda i, p=policy: contract.dynamic_forward(model, i, p))


def test_a_masked_run_reports_everything_it_masks():
    model = linear_cascade()
    table = build_cost_table(model, torch.randn(1, 8))
    x, policy = torch.randn(4, 8), PlannedExits([0, 1, 2, 0])
    masked = contract.dynamic_forward(model, x, policy, mode="mask")
    assert masked.trace.exit_index.tolist() == [0, 1, 2, 0]  # it selects, but it computed every stage and head
    rows = by_metric(decomposition_rows(masked.trace, table))
    full = table.exit_roles[-1]
    assert rows["expected_macs_backbone"]["value"] == full["backbone"] == 88
    assert rows["expected_macs_heads"]["value"] == full["heads"] == 42
    assert rows["macs_avoided_fraction"]["value"] == 0
    # and the masked run's split equals the split counted on the masked forward itself
    one = contract.dynamic_forward(model, x[:1], PlannedExits([0]), mode="mask").trace
    assert table_roles(one, table) == counted_roles(
        model, x[:1], table, lambda i: contract.dynamic_forward(model, i, PlannedExits([0]), mode="mask"))


def test_nothing_declared_is_all_backbone():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    table = build_cost_table(model, torch.randn(1, 5))
    assert contract.cost_roles(model) == {}
    assert table.unit_roles == {"full": {"backbone": 28, "heads": 0, "gates": 0, "routers": 0}}
    assert table.forward_count.total == table.exits[0] == 28


# ----- declarations and tables that do not add up are errors --------------------------------------

def test_roles_that_do_not_add_up_name_the_unit():
    table = build_cost_table(linear_cascade(), torch.randn(1, 8))
    wrong = {**table.unit_roles, "exit_1": {"backbone": 72, "heads": 29, "gates": 0, "routers": 0}}
    with pytest.raises(ValueError, match=r"cost unit 'exit_1': its MACs by role .* add up to 101, not to its 102"):
        replace(table, unit_roles=wrong)
    negative = {**table.unit_roles, "exit_0": {"backbone": 70, "heads": -4, "gates": 0, "routers": 0}}
    with pytest.raises(ValueError, match="cost unit 'exit_0': negative MACs by role"):
        replace(table, unit_roles=negative)
    assert ROLE_PARTS == ("backbone", "heads", "gates", "routers")


def test_bad_role_declarations_are_errors():
    model = linear_cascade()
    model.cost_roles = {"heads": ("heads",), "gates": ("heads.1",)}
    with pytest.raises(ValueError, match="'EarlyExitNetwork.heads.1' is declared both heads and gates"):
        build_cost_table(model, torch.randn(1, 8))
    model.cost_roles = {"heads": ("head",)}
    with pytest.raises(ValueError, match="heads pattern 'head' matches no submodule"):
        build_cost_table(model, torch.randn(1, 8))
    model.cost_roles = {"exits": ("heads",)}
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['exits'\]"):
        build_cost_table(model, torch.randn(1, 8))


# ----- the real baselines -------------------------------------------------------------------------------

def conv3x3(cin: int, cout: int, side: int) -> int:
    """MACs of a 3x3 convolution with ``side`` x ``side`` outputs."""
    return cin * cout * 9 * side * side


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return torch.randn(1, 3, 32, 32)


def test_branchynet_resnet20_at_each_forced_exit(image):
    model = create_model("branchynet_resnet20", num_classes=10).eval()
    table = build_cost_table(model, image)
    stem, stage1 = conv3x3(3, 16, 32), 6 * conv3x3(16, 16, 32)
    head0 = conv3x3(16, 32, 32) + conv3x3(32, 32, 32) + 32 * 10  # two conv-BN-ReLU, pool, FC
    head1 = 2 * conv3x3(16, 16, 32) + 16 * 10  # one residual block, pool, FC
    resnet20 = 40_551_040  # test_flops: count and fvcore agree; its FC is 64 x 10
    hand = [(stem, head0), (stem + stage1, head0 + head1), (resnet20 - 640, head0 + head1 + 640)]
    for k, (backbone, heads) in enumerate(hand):
        trace = model.trace_for_exits(torch.tensor([k]))
        rows = by_metric(expected_cost_rows(trace, table, f"exit{k}"))
        assert (rows["expected_macs_backbone"]["value"], rows["expected_macs_heads"]["value"]) == (backbone, heads)
        assert rows["expected_macs_gating"]["value"] == 0
        assert rows["macs_avoided_fraction"]["value"] == pytest.approx(1 - (backbone + heads) / table.exits[-1])
        assert json.loads(rows["macs_avoided_fraction"]["detail"])["forward_macs"] == resnet20
        parts_add_up(list(rows.values()))
        policy = PlannedExits([k])
        real = contract.dynamic_forward(model, image, policy).trace
        assert real.exit_index.tolist() == [k]
        assert table_roles(real, table) == counted_roles(model, image, table,
                                                         lambda i, p=policy: contract.dynamic_forward(model, i, p))


def test_skipnet38_gates_are_gating_and_the_backbone_follows_the_gates(image):
    model = create_model("skipnet38", num_classes=10).eval()
    table = build_cost_table(model, image)
    g = model.num_gates
    assert g == 17
    # recurrent gates: projections C->10 (5 x 16, 1 x 16, 5 x 32, 1 x 32, 5 x 64 input channels),
    # LSTM cell (10 + 10) x 40 and output 10 x 1 at each of the 17 gates
    gates = (6 * 16 + 6 * 32 + 5 * 64) * 10 + g * (20 * 40 + 10)
    assert gates == 19_850
    closed_backbone = conv3x3(3, 16, 32) + 2 * conv3x3(16, 16, 32)  # stem and the ungated first block
    open_backbone = (conv3x3(3, 16, 32) + 12 * conv3x3(16, 16, 32)
                     + 2 * (conv3x3(16, 32, 16) + conv3x3(32, 32, 16) + 10 * conv3x3(32, 32, 16)))
    assert open_backbone == 83_017_728  # ResNet-38 without its FC (stage 3 costs what stage 2 does)
    patterns = {"open": [True] * g, "closed": [False] * g, "mixed": [i % 3 == 0 for i in range(g)]}
    seen = {}
    for name, bits in patterns.items():
        trace = model.dynamic_forward(image, forced_gates=bits).trace
        rows = by_metric(expected_cost_rows(trace, table, name))
        assert rows["expected_macs_gating"]["value"] == gates and rows["expected_macs_heads"]["value"] == 640
        parts_add_up(list(rows.values()))
        seen[name] = rows["expected_macs_backbone"]["value"]
        assert table_roles(trace, table) == counted_roles(
            model, image, table, lambda i, b=bits: model.dynamic_forward(i, forced_gates=b))
    assert seen["open"] == open_backbone and seen["closed"] == closed_backbone
    assert seen["closed"] < seen["mixed"] < seen["open"]
    assert json.loads(rows["macs_avoided_fraction"]["detail"])["forward_macs"] is None  # forward() decides
    open_trace = model.dynamic_forward(image, forced_gates=patterns["open"]).trace
    assert by_metric(decomposition_rows(open_trace, table))["macs_avoided_fraction"]["value"] == 0


def test_moe_routers_are_gating_and_mask_mode_costs_more_than_the_full_network(image):
    model = create_model("moe_resnet20_top2", num_classes=10).eval()
    table = build_cost_table(model, image)
    routers = 2 * 64 * (64 * 4)  # 2 MoE layers, 64 tokens (8x8), router 64 -> 4 experts
    expert = 2 * 64 * 256  # per token: 64 -> 256 -> 64
    for mode in ("compact", "mask"):
        trace = contract.dynamic_forward(model, image, None, mode).trace
        rows = by_metric(expected_cost_rows(trace, table, mode))
        assert rows["expected_macs_gating"]["value"] == routers and rows["expected_macs_heads"]["value"] == 640
        chosen = 2 * 64 * (2 if mode == "compact" else 4)  # top-2 of 4 experts per token; mask: all 4
        assert rows["expected_macs_backbone"]["value"] == 40_551_040 - 640 + chosen * expert
        parts_add_up(list(rows.values()))
        assert table_roles(trace, table) == counted_roles(
            model, image, table, lambda i, m=mode: contract.dynamic_forward(model, i, None, m))
        assert rows["macs_avoided_fraction"]["value"] == pytest.approx(
            0.0 if mode == "compact" else -2 * 64 * 2 * expert / table.exits[-1])


def test_the_report_decomposes_every_point_not_chosen_on_test(tmp_path):
    from fractalbench.harness.runner import run_suite
    from fractalbench.harness.suites import parse_suite
    from fractalbench.reports import tables
    from fractalbench.reports.html import write_report

    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": ["branchynet_resnet20"],
           "train": {"epochs": 1, "max_steps_per_epoch": 2}, "metrics": ["accuracy", "sweep", "cost"],
           "budgets": [0.25, 0.75]}
    run_suite(parse_suite(raw, "t.yaml"), tmp_path)
    table = tables.cost_decomposition(tables.combined_rows(tables.load_runs([tmp_path])))
    assert sorted(table.policy) == ["confidence@budget0.25", "confidence@budget0.75"]  # the test grid is left out
    for row in table.to_dict("records"):
        parts = row["backbone MACs"] + row["heads MACs"] + row["gates/routers MACs"]
        assert parts == pytest.approx(row["MACs"], rel=1e-12)
        assert row["gates/routers MACs"] == 0 and row["heads MACs"] > 0  # a cascade has heads, no gates
        assert 0 < row["share of full network avoided"] < 1
    html = write_report(tmp_path).read_text()
    assert "Cost, decomposed" in html and (tmp_path / "report" / "cost_decomposition.csv").is_file()
