"""FractalNet (Larsson, Maire and Shakhnarovich, "FractalNet: Ultra-Deep Neural Networks without
Residuals", ICLR 2017), with its columns as anytime exits.

Structure (paper sec. 2 and 4): the expansion rule f_1(z) = conv(z),
f_{C+1}(z) = join(f_C(f_C(z)), conv(z)) with conv = conv3x3-BN-ReLU and join = element-wise mean.
As in the paper's Figure 1 (and the authors' code), directly nested joins are merged into one join
of all their inputs, so the join at depth d of a block averages every column that ends a layer
there (the last join of a block averages all C columns). Column c (0 = shallowest) has 2^c conv
layers per block; the deepest path of B blocks has B x 2^(C-1) layers. CIFAR net: B = 5 blocks of
64, 128, 256, 512, 512 filters, 2x2 max pooling after each block, then the classifier.

Regularisation in training (paper sec. 3):

- dropout per block, rate (0, 0.1, 0.2, 0.3, 0.4), inside every conv unit as in the authors' code
  (conv - dropout - BN - ReLU);
- local drop-path: every join with two or more inputs drops each input with probability 0.15
  (one draw per join per mini-batch) and keeps at least one (a random one when all would go);
  dropped inputs are not computed;
- global drop-path: half of each mini-batch (a random half) runs a single column, chosen once per
  mini-batch and the same in every block; the other half uses local drop-path. The two halves
  run as separate sub-batches (batch norm sees each half on its own).

Batch-norm statistics per path. Drop-path trains every BN on a mixture of inputs (a join of one,
two or all columns; a single column under global drop-path), so the running statistics fit none of
the networks run at test time: at eval, joins average all their inputs (lower variance than the
training mixture) and the error compounds over 20 BN layers. On 16x16 digits after 15 epochs the
full network scored 10-20% top-1 with the running statistics and 98.6% with statistics re-estimated
on its own path. So every BN keeps one set of population statistics per inference path (path 0 =
the full network, path k + 1 = column k alone), estimated after training from training images run
through that path (precise BN: exact mean and biased variance over the calibration set; the
trainer calls :meth:`FractalNet.on_train_end`, or call :meth:`FractalNet.calibrate_batchnorm`).
Eval-mode forwards use their path's statistics once calibrated and the running statistics before.
This is what slimmable/anytime networks do with shared weights and several inference paths
(Yu et al., "Universally Slimmable Networks", ICCV 2019, BN calibration); the paper itself does
not discuss it.

Anytime exits (the paper's "deepest column alone" generalised): exit k is column k alone, i.e. the
network with every block restricted to column k, followed by the shared classifier. Exits are
ordered shallowest first (exit 0 = column 0 = B conv layers). Columns share no conv layers, so a
cascade that reaches exit k has run columns 0..k each as its own subnetwork, their classifier
heads and the decisions at exits 0..k-1: that is the forced path and the cost of exit k.
``forward`` is the full fractal network (all columns joined), which is what training optimises;
it is not one of the exits.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import ExitPolicy, default_policy
from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = "Larsson, Maire, Shakhnarovich: FractalNet: Ultra-Deep Neural Networks without Residuals, ICLR 2017"
CIFAR_WIDTHS = (64, 128, 256, 512, 512)
LOCAL_DROP = 0.15
GLOBAL_FRACTION = 0.5


def local_keep_mask(num_inputs: int, drop_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Which inputs of a join survive local drop-path: each is dropped with ``drop_prob``; when all
    would be dropped, one chosen uniformly at random is kept. Bool tensor [num_inputs]."""
    keep = torch.rand(num_inputs, generator=generator) >= drop_prob
    if not keep.any():
        keep[torch.randint(num_inputs, (1,), generator=generator)] = True
    return keep


class PathBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with population statistics per inference path (see the module docstring).

    ``selector``: a one-element list shared by every BN of the model holding the active path.
    Training mode: plain batch norm (batch statistics, running statistics updated). Eval mode: the
    active path's statistics when that path was calibrated, else the running statistics.
    While ``collecting`` (calibration), it normalises with batch statistics and accumulates the
    per-channel sum and sum of squares of its input in float64.
    """

    def __init__(self, planes: int, num_paths: int, selector: list[int]) -> None:
        super().__init__(planes)
        self.selector = selector
        self.register_buffer("path_mean", torch.zeros(num_paths, planes))
        self.register_buffer("path_var", torch.ones(num_paths, planes))
        self.register_buffer("path_ready", torch.zeros(num_paths, dtype=torch.bool))
        self._ready = [False] * num_paths  # python copy of path_ready: no device sync per forward
        self.collecting: list[Tensor | int] | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_ready())

    def _sync_ready(self) -> None:
        self._ready = [bool(v) for v in self.path_ready.tolist()]

    def forward(self, x: Tensor) -> Tensor:
        if self.collecting is not None:
            acc = self.collecting
            xd = x.detach().double()
            acc[0] = acc[0] + xd.sum(dim=(0, 2, 3))
            acc[1] = acc[1] + (xd * xd).sum(dim=(0, 2, 3))
            acc[2] = int(acc[2]) + x.shape[0] * x.shape[2] * x.shape[3]
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        path = self.selector[0]
        if not self.training and self._ready[path]:
            return F.batch_norm(x, self.path_mean[path], self.path_var[path], self.weight, self.bias, False, 0.0,
                                self.eps)
        return super().forward(x)

    def finish_path(self, path: int) -> None:
        """Store the statistics collected since ``collecting`` was set as path ``path``'s."""
        total, squares, count = self.collecting  # type: ignore[misc]
        self.collecting = None
        if not count:  # not on this path (e.g. column 0's convs on column 1's path)
            return
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        self.path_mean[path] = mean.to(self.path_mean.dtype)
        self.path_var[path] = var.to(self.path_var.dtype)
        self.path_ready[path] = True
        self._sync_ready()


class ConvUnit(nn.Sequential):
    """conv3x3 - dropout - BN - ReLU (the authors' order; dropout omitted when its rate is 0)."""

    def __init__(self, in_planes: int, planes: int, dropout: float = 0.0,
                 num_paths: int = 1, selector: list[int] | None = None) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [PathBatchNorm2d(planes, num_paths, selector if selector is not None else [0]), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class FractalBlock(nn.Module):
    """f_C with merged joins. ``columns[c][j]`` is the j-th conv unit of column c (2^c of them)."""

    def __init__(self, num_columns: int, in_planes: int, planes: int, dropout: float = 0.0,
                 local_drop: float = LOCAL_DROP, selector: list[int] | None = None) -> None:
        super().__init__()
        if num_columns < 1:
            raise ValueError(f"a fractal block needs at least one column, got {num_columns}")
        self.num_columns = num_columns
        self.local_drop = local_drop
        self.columns = nn.ModuleList(
            nn.ModuleList(ConvUnit(in_planes if j == 0 else planes, planes, dropout, num_columns + 1, selector)
                          for j in range(2 ** c))
            for c in range(num_columns))
        depth = 2 ** (num_columns - 1)
        # joins[d] = (column, conv index) of every column that ends a conv at depth d + 1
        self.joins: list[list[tuple[int, int]]] = [
            [(c, (d // 2 ** (num_columns - 1 - c)) - 1) for c in range(num_columns)
             if d % 2 ** (num_columns - 1 - c) == 0]
            for d in range(1, depth + 1)]
        self.last_keep_masks: list[Tensor] = []  # training: the local drop-path masks of the last call

    def forward(self, x: Tensor) -> Tensor:
        """All columns, joined (local drop-path in training)."""
        drop = self.training and self.local_drop > 0
        if drop:
            self.last_keep_masks = []
        outs = [x] * self.num_columns
        joined = x
        for members in self.joins:
            if drop and len(members) > 1:
                keep = local_keep_mask(len(members), self.local_drop)
                self.last_keep_masks.append(keep)
                alive = [m for m, k in zip(members, keep.tolist()) if k]
            else:
                alive = members
            values = [self.columns[c][j](outs[c]) for c, j in alive]
            joined = values[0] if len(values) == 1 else torch.stack(values).mean(0)
            for c, _ in members:
                outs[c] = joined
        return joined

    def column_forward(self, x: Tensor, column: int) -> Tensor:
        """Column ``column`` alone: its 2^column conv units in sequence (no joins)."""
        for unit in self.columns[column]:
            x = unit(x)
        return x


class FractalNet(DynamicModel):
    """B fractal blocks (B = len(widths)) of C columns, 2x2 max pooling after each, classifier.

    Exits: column k alone (k = 0 shallowest .. C-1 deepest). ``forward``: the full network.
    The classifier is global average pooling + FC: after five poolings a 32x32 input is 1x1, so
    this is the paper's flatten + FC there, and it also accepts other input sizes (pooling uses
    ceil mode, so 16x16 inputs work too).
    """

    dynamic_kind = "early_exit"
    # drop-path leaves some parameters without a gradient in a step: DDP must look for unused ones
    ddp_find_unused_parameters = True
    # forward() (all columns joined) is not one of the exits: the runner reports it as `top1_full`
    full_network_is_exit = False
    # MACs by role (fractalbench.harness.contract.cost_roles): the shared classifier is every exit's head
    cost_roles = {"heads": ("head",)}

    def __init__(self, num_classes: int = 10, in_chans: int = 3, columns: int = 3,
                 widths: Sequence[int] = CIFAR_WIDTHS, dropout: Sequence[float] | None = None,
                 local_drop: float = LOCAL_DROP, global_fraction: float = GLOBAL_FRACTION) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("FractalNet needs at least one block width")
        if dropout is None:
            dropout = tuple(round(0.1 * b, 10) for b in range(len(widths)))
        if len(dropout) != len(widths):
            raise ValueError(f"dropout needs one rate per block ({len(widths)}), got {len(dropout)}")
        if not 0.0 <= local_drop < 1.0 or not 0.0 <= global_fraction <= 1.0:
            raise ValueError(f"local_drop must be in [0, 1) and global_fraction in [0, 1], "
                             f"got {local_drop}, {global_fraction}")
        self.num_columns, self.widths, self.dropout = columns, widths, tuple(float(p) for p in dropout)
        self.local_drop, self.global_fraction = float(local_drop), float(global_fraction)
        self.path_selector = [0]  # the active inference path for PathBatchNorm2d (0 = full, k + 1 = column k)
        self.calibration_samples = 2048
        blocks, in_planes = [], in_chans
        for planes, p in zip(widths, self.dropout):
            blocks.append(FractalBlock(columns, in_planes, planes, p, local_drop, self.path_selector))
            in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
        self.last_global_column: int | None = None
        self.last_global_samples: Tensor | None = None

    @property
    def num_exits(self) -> int:
        return self.num_columns

    @property
    def depth(self) -> int:
        """Conv layers on the deepest path: B x 2^(C-1)."""
        return len(self.widths) * 2 ** (self.num_columns - 1)

    # ----- the networks -------------------------------------------------------------------------

    def forward_fractal(self, x: Tensor) -> Tensor:
        """The full fractal network (local drop-path only, in training)."""
        self.path_selector[0] = 0
        for block in self.blocks:
            x = self.pool(block(x))
        return self.head(x)

    def forward_column(self, x: Tensor, column: int) -> Tensor:
        """Column ``column`` alone in every block, then the classifier: the logits of exit ``column``."""
        self.path_selector[0] = column + 1
        for block in self.blocks:
            x = self.pool(block.column_forward(x, column))
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Full network. In training, a random ``global_fraction`` of the batch runs one column
        (global drop-path, one column per batch) and the rest the joined network (local drop-path)."""
        n = x.shape[0]
        n_global = int(n * self.global_fraction) if self.training else 0
        self.last_global_column, self.last_global_samples = None, None
        if n_global == 0:
            return self.forward_fractal(x)
        perm = torch.randperm(n, device=x.device)
        chosen, rest = perm[:n_global], perm[n_global:]
        column = int(torch.randint(self.num_columns, (1,)))
        self.last_global_column, self.last_global_samples = column, chosen
        parts = [self.forward_column(x[chosen], column)]
        if rest.numel():
            parts.append(self.forward_fractal(x[rest]))
        return torch.cat(parts)[torch.argsort(perm)]

    # ----- batch-norm statistics per path ----------------------------------------------------------

    def path_batchnorms(self) -> list[PathBatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, PathBatchNorm2d)]

    @torch.no_grad()
    def calibrate_batchnorm(self, batches: Iterable[Tensor]) -> None:
        """Population statistics of every BN on every path (full network, each column alone) from
        ``batches`` of images (training data). Eval mode (no dropout, no drop-path) throughout."""
        batches = list(batches)
        if not batches:
            raise ValueError("calibrate_batchnorm needs at least one batch of images")
        was_training = self.training
        self.eval()
        bns = self.path_batchnorms()
        try:
            for path in range(self.num_columns + 1):
                for bn in bns:
                    bn.collecting = [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0]
                for x in batches:
                    if path == 0:
                        self.forward_fractal(x)
                    else:
                        self.forward_column(x, path - 1)
                for bn in bns:
                    bn.finish_path(path)
        finally:
            for bn in bns:
                bn.collecting = None
            self.train(was_training)

    def on_train_end(self, train_set: Any, batch_size: int, device: Any) -> None:
        """Called by the trainer after the last epoch: BN statistics per path from the first
        ``calibration_samples`` training images (in order, with the training transforms)."""
        n = min(len(train_set), self.calibration_samples)
        images = [train_set[i][0] for i in range(n)]
        self.calibrate_batchnorm(torch.stack(images[i:i + batch_size]).to(device) for i in range(0, n, batch_size))

    # ----- the dynamic protocol -------------------------------------------------------------------

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward_column(x, k) for k in range(self.num_columns)]

    def forced_forward(self, x: Tensor, exit_index: int, policy: ExitPolicy | None = None) -> Tensor:
        """Columns 0..k each on the whole input, their heads, and the decisions at exits 0..k-1."""
        check_exit_index(self, exit_index)
        policy = policy or default_policy()
        state = policy.init_state(x.shape[0], x.device)
        logits = x
        for k in range(exit_index + 1):
            logits = self.forward_column(x, k)
            if k < exit_index:
                _, state = policy.decide(k, logits, state)
        return logits

    def dynamic_forward(self, x: Tensor, policy: ExitPolicy | None = None, mode: str = "compact") -> DynamicOutput:
        """Run column 0 on everyone, let the policy take samples out, run column 1 on the rest, ...
        ``mode="mask"`` runs every column on every sample and then selects (labelled variant)."""
        check_mode(mode)
        policy = policy or default_policy()
        n, last, device = x.shape[0], self.num_columns - 1, x.device
        if mode == "mask":
            all_logits = self.forward_exits(x)
            exit_index = policy.simulate(all_logits)
            out = torch.stack(all_logits)[exit_index, torch.arange(n, device=device)]
            return DynamicOutput(out, Trace(exit_index, self._one_hot_counts(torch.full_like(exit_index, last))))
        index = torch.arange(n, device=device)
        exit_index = torch.full((n,), last, dtype=torch.long, device=device)
        state = policy.init_state(n, device)
        out: Tensor | None = None
        inputs = x
        for k in range(self.num_columns):
            logits = self.forward_column(inputs, k)
            if out is None:
                out = logits.new_empty((n, logits.shape[-1]))
            if k == last:
                out[index] = logits
                break
            leave, state = policy.decide(k, logits, state)
            if leave.any():
                out[index[leave]] = logits[leave]
                exit_index[index[leave]] = k
                stay = ~leave
                if not stay.any():
                    break
                inputs, index = inputs[stay], index[stay]
                state = {name: v[stay] for name, v in state.items()}
        return DynamicOutput(out, Trace(exit_index, self._one_hot_counts(exit_index)))

    def trace_for_exits(self, exit_index: Tensor) -> Trace:
        """What compact inference records: the units of the path to each sample's exit."""
        return Trace(exit_index, self._one_hot_counts(exit_index))

    def _one_hot_counts(self, exit_index: Tensor) -> dict[str, Tensor]:
        return {f"exit_{k}": (exit_index == k).float() for k in range(self.num_columns)}

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The paper trains the full network (with drop-path); one term."""
        return {"cross_entropy": F.cross_entropy(self(x), y)}

    def cost_units(self) -> list[CostUnit]:
        """One unit per exit: the forced path to it (counts: 1 for the exit a sample took)."""
        return [CostUnit(f"exit_{k}", (lambda x, k=k: self.forced_forward(x, k))) for k in range(self.num_columns)]


def _notes(columns: int) -> str:
    common = (
        "Joins of nested fractals are merged (mean of all columns ending at a depth), as in the paper's "
        "Figure 1 and the authors' code; the authors' code pools each input before a block's last join, here "
        "the join comes first, then 2x2 max pooling (ceil mode, so 16x16 inputs work). Classifier: global "
        "average pooling + FC, identical to flatten + FC at 32x32 (the map is 1x1 after five poolings). "
        "Dropout inside each conv unit (conv-dropout-BN-ReLU, the authors' order). Global drop-path: a random "
        "half of every mini-batch runs one column (chosen per batch, same in every block) as its own sub-batch. "
        "Xavier-uniform initialisation. Exits: column k alone + the shared classifier, shallowest first; "
        "cost of exit k = columns 0..k (a cascade re-runs each column from the input). ")
    if columns == 3:
        return common + (
            "Parameters: 33,724,618 here (convs 3x3 without bias + BN + FC 512->10) vs 38.6M in the paper's "
            "Table 1; the paper's text describes no layer that accounts for the 4.9M (about two extra 512x512 "
            "3x3 convs), so the difference is left as is.")
    return common + (
        "This 40-layer build keeps the 20-layer's widths (64..512 per block for every column): 76,106,634 "
        "parameters. The paper's 40-layer entry is a different, smaller configuration (fewer parameters than "
        "its 20-layer net, per-column widths given in a table footnote) that is not reproduced here.")


#: FractalNet sec. 4 (training), as the paper gives it for CIFAR.
FRACTAL_RECIPE = {"epochs": 400, "batch_size": 100, "optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": False,
                  "weight_decay": 0.0, "schedule": "step", "milestones": (200, 300, 350, 375), "gamma": 0.1,
                  "precision": "fp32"}
FRACTAL_RECIPE_NOTE = (
    "FractalNet sec. 4: 400 epochs on CIFAR, SGD with momentum 0.9, batch 100, lr 0.02 divided by 10 each time "
    "the remaining epochs halve (200, 300, 350, 375), Xavier init; dropout (0, 0.1, 0.2, 0.3, 0.4) per block and "
    "local drop-path 0.15 with global drop-path on half of the batches for the '+ drop-path + dropout' rows; C10+ "
    "/ C100+ = translation + mirroring. Weight decay is not stated in the paper: 0 here, as in the "
    "reimplementation khanrc/pt.fractalnet that follows the paper's settings (unconfirmed)")
#: FractalNet Table 1, 20 layers (B = 5, C = 3), 38.6M parameters, test error on C10+ and C100+ (augmented).
FRACTAL20_REFERENCE = {
    "params": 38.6e6, "depth": 20,
    "top1_cifar10": 100 - 4.68, "top1_full_cifar10": 100 - 4.60, "nodrop_top1_full_cifar10": 100 - 5.22,
    "top1_cifar100": 100 - 24.32, "top1_full_cifar100": 100 - 23.73, "nodrop_top1_full_cifar100": 100 - 23.30,
}
FRACTAL20_SOURCE = (
    "FractalNet Table 1, 20 layers, 38.6M params, test error on C10+ / C100+ (standard augmentation): "
    "'+ drop-path + dropout' row 4.60 / 23.73 (top1_full_*: the full network; the builder's defaults train this "
    "way), its '-> deepest column alone' row 4.68 / 24.32 (top1_*: this build's last exit is the deepest column), "
    "the plain row without drop-path and dropout 5.22 / 23.30 (nodrop_top1_full_*; better than with them on "
    "C100+); accuracy = 100 - error. Table values as quoted in the 'Paper' rows of khanrc/pt.fractalnet's README")


@register_model(card=ModelCard(family="fractalnet", paper=PAPER, dynamic_kind="early_exit", input_size=32,
                               reference=dict(FRACTAL20_REFERENCE), reference_source=FRACTAL20_SOURCE,
                               notes=_notes(3), paper_recipe=recipe_text(FRACTAL_RECIPE, FRACTAL_RECIPE_NOTE)))
def fractalnet20(*, num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = CIFAR_WIDTHS,
                 dropout: Sequence[float] | None = None, local_drop: float = LOCAL_DROP,
                 global_fraction: float = GLOBAL_FRACTION) -> FractalNet:
    """B = 5 blocks, C = 3 columns (20 layers on the deepest path)."""
    return FractalNet(num_classes, in_chans, 3, widths, dropout, local_drop, global_fraction)


@register_model(card=ModelCard(family="fractalnet", paper=PAPER, dynamic_kind="early_exit", input_size=32,
                               reference={"depth": 40}, reference_source="FractalNet sec. 4: B = 5, C = 4",
                               notes=_notes(4), paper_recipe=recipe_text(FRACTAL_RECIPE, FRACTAL_RECIPE_NOTE)))
def fractalnet40(*, num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = CIFAR_WIDTHS,
                 dropout: Sequence[float] | None = None, local_drop: float = LOCAL_DROP,
                 global_fraction: float = GLOBAL_FRACTION) -> FractalNet:
    """B = 5 blocks, C = 4 columns (40 layers on the deepest path)."""
    return FractalNet(num_classes, in_chans, 4, widths, dropout, local_drop, global_fraction)
