"""Compute: MACs counted on what actually ran, cost tables, expected cost of dynamic models.

Three layers, as in fvcore: per-operator formulas (torch's ``flop_registry`` plus
:data:`EXTRA_FORMULAS`), one counting engine (:class:`MacCounter`: ``FlopCounterMode`` plus a
dispatch mode that records every aten op so that ops no formula covers are listed, not silently
dropped), and the public functions (:func:`count_macs`, :func:`build_cost_table`,
:func:`expected_macs`, :func:`oracle_check`, :func:`cost_rows`).

Definitions
-----------
- One MAC is one multiply-accumulate. ``FlopCounterMode`` counts 2 FLOPs per MAC for
  convolutions and matrix products (mm, addmm, bmm, baddbmm, attention); MACs = its FLOPs / 2.
  Bias additions are not counted (the published CIFAR-ResNet/ImageNet numbers do not either).
- Ops in :data:`ZERO_MAC_OPS` (views, copies, element-wise arithmetic, activations,
  normalisation, pooling, reductions, indexing) cost 0 MACs by definition. Every other executed
  op without a formula is reported in ``unsupported_ops`` (name -> times executed): its work is
  missing from the total, and a table that shows the total should say so.
- Counting is at the dispatcher, so only what ran is counted: an early exit that really stops,
  a skipped block or an unchosen expert costs nothing. fvcore (:func:`fvcore_count`) traces the
  graph instead and is a cross-check for static models only.
- Cost table: ``units[u]`` = MACs of the probe of unit ``u`` minus the MACs of the probe of its
  baseline unit (both at batch 1); ``exits[k]`` = MACs of ``forced_forward(x, k)``, the
  cumulative cost of leaving at exit k (earlier heads and decisions included).
- Executed MACs of sample n = sum_u unit_counts[u][n] x units[u] (:func:`harness.contract.executed_macs`);
  the expected MACs of a dynamic model over a dataset is their mean. The oracle counts single
  samples at batch 1 on the real ``dynamic_forward`` and must agree exactly.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from harness import contract
from harness.metrics import MIN_SAMPLES_P99, Summary, summarize
from harness.metrics import field_row as _row

# ----- layer 1: formulas and the zero-MAC allowlist ---------------------------------------------

aten = torch.ops.aten


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _addmv_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _addbmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[2]


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """Mark a formula as taking the op's raw arguments (tensors, not shapes), as torch's own do."""
    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


def _prod(dims: Any) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Fused scaled-dot-product attention, any batch/head dims [..., L, E] x [..., S, E] x [..., S, Ev]:
    Q K^T (L*S*E MACs) and A V (L*S*Ev MACs) per batch-head (GQA: key/value heads are broadcast)."""
    *batch, length, e = query_shape
    source, e_v = key_shape[-2], value_shape[-1]
    return 2 * _prod(batch) * length * source * (e + e_v)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Its backward, as torch counts the other fused kernels': recompute Q K^T, dA = dO V^T,
    dV = A^T dO, dQ = dS K, dK = dS^T Q: L*S*(3E + 2Ev) MACs per batch-head."""
    *batch, length, e = query_shape
    source, e_v = key_shape[-2], value_shape[-1]
    return 2 * _prod(batch) * length * source * (3 * e + 2 * e_v)


def _sequence_lengths(t: Tensor) -> list[int]:
    """Token count of every sequence of a [B, L, E] / [L, E] tensor, or of a nested tensor's
    sequences (its padding is not work a sample needs)."""
    if t.is_nested:
        return [int(size[0]) for size in t._nested_tensor_size().tolist()]
    if t.dim() == 2:
        return [int(t.shape[0])]
    return [int(t.shape[-2])] * _prod(t.shape[:-2])


def _attention_block_macs(lq: list[int], lk: list[int], embed_dim: int, proj_weight: Tensor) -> int:
    """MACs of multi-head attention with its projections (heads do not change the count):
    Q, K, V projections (E x E each, per query/key token), Q K^T and A V (L*S*E each, summed
    over heads: H * L * S * E/H), output projection."""
    e = int(embed_dim)
    in_proj = (sum(lq) + 2 * sum(lk)) * e * e
    attention = 2 * sum(q * k for q, k in zip(lq, lk)) * e
    out_proj = sum(lq) * int(proj_weight.shape[0]) * int(proj_weight.shape[1])
    return in_proj + attention + out_proj


@_raw
def _native_mha_flop(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias, *args,
                     out_val=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fused fast path (eval, no grad): projections + attention."""
    return 2 * _attention_block_macs(_sequence_lengths(query), _sequence_lengths(key), embed_dim, proj_weight)


@_raw
def _transformer_encoder_layer_flop(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, *args,
                                    out_val=None, **kwargs) -> int:
    """``nn.TransformerEncoderLayer``'s fused fast path: self-attention block + feed-forward
    (E -> F -> E per token). Arguments after ``proj_bias``: use_gelu, norm_first, eps, the two
    norms' weights and biases, then ffn_weight_1, ffn_bias_1, ffn_weight_2."""
    ffn_weight_1 = args[7] if len(args) > 7 else kwargs["ffn_weight_1"]
    ffn_weight_2 = args[9] if len(args) > 9 else kwargs["ffn_weight_2"]
    lengths = _sequence_lengths(src)
    ffn = sum(lengths) * (ffn_weight_1.numel() + ffn_weight_2.numel())
    return 2 * (_attention_block_macs(lengths, lengths, embed_dim, proj_weight) + ffn)


EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    aten.mv: _mv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
    aten.addmv: _addmv_flop,
    aten.addbmm: _addbmm_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flop,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flop,
    aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_backward_flop,
    aten._scaled_dot_product_attention_math_for_mps: _sdpa_flop,
    aten._native_multi_head_attention: _native_mha_flop,
    aten._transformer_encoder_layer_fwd: _transformer_encoder_layer_flop,
}
"""Ops that torch's flop registry lacks (FLOPs = 2 x MACs): matrix-vector and vector products,
the CPU (and out-of-tree/MPS) fused attention kernels behind ``F.scaled_dot_product_attention``,
and the fused fast paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in eval
mode without grad, counted as the same layers written with explicit matmuls."""

ZERO_MAC_CATEGORIES: dict[str, tuple[str, ...]] = {
    "metadata and scalars": (
        "size", "sym_size", "stride", "sym_stride", "dim", "numel", "sym_numel", "storage_offset",
        "sym_storage_offset", "is_contiguous", "sym_is_contiguous", "is_strides_like_format",
        "is_non_overlapping_and_dense", "layout", "device", "_local_scalar_dense", "item", "is_nonzero",
        "equal", "is_same_size", "result_type",
    ),
    "views and layout": (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "permute", "transpose",
        "t", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "slice", "select", "narrow", "as_strided",
        "alias", "detach", "detach_", "split", "split_with_sizes", "unbind", "chunk", "flatten", "unflatten",
        "diagonal", "movedim", "view_as", "unfold", "lift_fresh", "_reshape_copy", "as_strided_", "resolve_conj",
        "resolve_neg", "_nested_tensor_size", "_nested_tensor_from_mask", "_nested_tensor_from_mask_left_aligned",
        "to_padded_tensor",
    ),
    "copies, creation and randomness": (
        "clone", "contiguous", "copy", "copy_", "_to_copy", "to", "lift_fresh_copy", "cat", "stack", "flip",
        "roll", "repeat", "repeat_interleave", "empty", "empty_like", "empty_strided", "new_empty",
        "new_empty_strided", "new_zeros", "new_ones", "new_full", "zeros", "zeros_like", "ones", "ones_like",
        "full", "full_like", "fill", "fill_", "zero_", "arange", "linspace", "scalar_tensor", "resize_",
        "set_", "rand", "rand_like", "randn", "randn_like", "randint", "randperm", "normal_", "uniform_",
        "bernoulli", "bernoulli_", "native_dropout", "dropout", "constant_pad_nd", "pad", "reflection_pad1d",
        "reflection_pad2d", "replication_pad1d", "replication_pad2d", "pixel_shuffle", "pixel_unshuffle",
        "channel_shuffle", "tril", "triu",
    ),
    "indexing and selection": (
        "index", "index_select", "index_put", "index_put_", "_index_put_impl_", "index_copy", "index_copy_",
        "index_fill", "index_fill_", "index_add", "index_add_", "gather", "scatter", "scatter_",
        "scatter_add", "scatter_add_", "scatter_reduce", "masked_fill", "masked_fill_", "masked_select",
        "masked_scatter", "masked_scatter_", "nonzero", "nonzero_static", "where", "take", "embedding",
        "one_hot", "topk", "sort", "argsort", "_unique2", "unique_dim", "unique_consecutive", "bincount",
        "searchsorted", "bucketize", "histc",
    ),
    "element-wise arithmetic and comparisons": (
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "exp2",
        "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow", "square", "reciprocal", "sign",
        "floor", "ceil", "round", "trunc", "frac", "remainder", "fmod", "floor_divide", "maximum", "minimum",
        "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "eq", "ne", "lt", "le",
        "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or",
        "bitwise_not", "bitwise_xor", "isnan", "isinf", "isfinite", "nan_to_num", "addcmul", "addcdiv",
        "lerp", "erf", "erfc", "sin", "cos", "tan", "atan2", "hypot",
    ),
    "activations and softmax": (
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid",
        "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid",
        "hardsigmoid_", "elu", "elu_", "selu", "celu", "softplus", "mish", "threshold", "threshold_",
        "prelu", "_prelu_kernel", "glu", "logsigmoid", "_softmax", "softmax", "_log_softmax", "log_softmax",
        "_safe_softmax",
    ),
    "reductions": (
        "sum", "mean", "amax", "amin", "max", "min", "aminmax", "argmax", "argmin", "any", "all", "prod",
        "var", "std", "var_mean", "std_mean", "logsumexp", "cumsum", "cumprod", "cummax", "cummin",
        "linalg_vector_norm", "norm", "median", "nanmedian", "mode", "kthvalue", "count_nonzero",
    ),
    "normalisation (folds into the preceding conv at inference)": (
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_with_update",
        "_batch_norm_no_update", "native_layer_norm", "native_group_norm", "_fused_rms_norm", "rms_norm",
        "instance_norm",
    ),
    "pooling and nearest resampling": (
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
        "max_pool2d_with_indices", "max_pool3d_with_indices", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "mkldnn_adaptive_avg_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
        "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    ),
}
"""Ops that cost 0 MACs by definition, by category (aten names without overload)."""

ZERO_MAC_OPS: frozenset[str] = frozenset(f"aten.{name}" for names in ZERO_MAC_CATEGORIES.values() for name in names) | frozenset(
    {"prim.layout", "prim.device"})


def _op_name(func: Any) -> str:
    """'aten.convolution' for any overload of aten::convolution; a higher-order op's own name."""
    packet = getattr(func, "_overloadpacket", func)
    qualified = getattr(packet, "_qualified_op_name", None)
    if qualified:
        return qualified.replace("::", ".")
    return str(getattr(packet, "__name__", None) or packet)


# ----- layer 2: the engine ----------------------------------------------------------------------

@dataclass(frozen=True)
class MacCount:
    """MACs of one counted call. ``by_module`` uses FlopCounterMode's module hierarchy
    (``RootClass.child.grandchild``); ``unsupported_ops`` maps op name -> times executed."""

    total: int | float
    by_module: dict[str, int | float] = field(default_factory=dict)
    by_operator: dict[str, int | float] = field(default_factory=dict)
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    op_calls: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int | float:
        return 2 * self.total


def _macs(flops: int) -> int | float:
    return flops // 2 if flops % 2 == 0 else flops / 2


class _OpRecorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher below FlopCounterMode (after its decompositions)."""

    def __init__(self, registry: Mapping[Any, Any]) -> None:
        super().__init__()
        self.registry = registry
        self.calls: Counter[str] = Counter()
        self.unsupported: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.calls[name] += 1
        if getattr(func, "_overloadpacket", func) not in self.registry and name not in ZERO_MAC_OPS:
            self.unsupported[name] += 1
        return func(*args, **(kwargs or {}))


class MacCounter:
    """Context manager: counts the MACs of everything run inside it. ``module`` names the module
    hierarchy (without it, names start at the first module called). Grad mode is left as it is."""

    def __init__(self, module: nn.Module | None = None) -> None:
        self.module = module
        self._result: MacCount | None = None

    def __enter__(self) -> "MacCounter":
        self._counter = FlopCounterMode(display=False, depth=None, custom_mapping=EXTRA_FORMULAS)
        if self.module is not None:
            _seed_module_names(self._counter, self.module)
        self._recorder = _OpRecorder(self._counter.flop_registry)
        self._recorder.__enter__()
        try:
            self._counter.__enter__()
        except BaseException:
            self._recorder.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._counter.__exit__(*exc)
        finally:
            self._recorder.__exit__(*exc)
        counts = self._counter.get_flop_counts()
        glob = counts.get("Global", {})
        self._result = MacCount(
            total=_macs(sum(glob.values())),
            by_module={name: _macs(sum(ops.values())) for name, ops in counts.items() if name != "Global"},
            by_operator={_op_name(op): _macs(v) for op, v in glob.items()},
            unsupported_ops=dict(self._recorder.unsupported),
            op_calls=dict(self._recorder.calls),
        )

    def result(self) -> MacCount:
        if self._result is None:
            raise RuntimeError("MacCounter.result() is available after the with-block ends")
        return self._result


def _seed_module_names(counter: FlopCounterMode, module: nn.Module) -> None:
    """Name every submodule by its path in ``module`` even when the root's forward is not called
    (probes and forced paths call submodules directly)."""
    tracker = getattr(counter, "mod_tracker", None)
    known, seen = getattr(tracker, "_known_modules", None), getattr(tracker, "_seen_modules", None)
    if known is None or seen is None:
        return
    root = type(module).__name__
    for name, mod in module.named_modules():
        if mod not in known:
            known[mod] = f"{root}.{name}" if name else root
            seen.add(mod)


def count_macs(fn: Callable[..., Any], *args: Any, module: nn.Module | None = None, **kwargs: Any) -> MacCount:
    """MACs executed by ``fn(*args, **kwargs)`` under ``torch.no_grad()``.

    ``module`` names the module hierarchy in ``by_module`` (default: ``fn`` if it is a module).
    """
    if module is None and isinstance(fn, nn.Module):
        module = fn
    with torch.no_grad(), MacCounter(module) as counter:
        fn(*args, **kwargs)
    return counter.result()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


# ----- fvcore cross-check -------------------------------------------------------------------------

FVCORE_MAC_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum", "mm")
"""fvcore operators that are multiply-accumulates (fvcore counts one fused multiply-add as one flop)."""


@dataclass(frozen=True)
class FvcoreCount:
    """fvcore's count. ``macs``: its conv/linear/matmul operators only (comparable with
    :func:`count_macs`); ``total``: everything it counts (also norms, pooling, upsampling)."""

    macs: int
    total: int
    by_operator: dict[str, int]
    unsupported_ops: dict[str, int]
    uncalled_modules: list[str]


def fvcore_count(model: nn.Module, x: Tensor) -> FvcoreCount:
    """fvcore ``FlopCountAnalysis`` of ``model(x)`` (traced with torch.jit; static models only)."""
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and jit tracing warn; the result says what it skipped
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, (x,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = {k: int(v) for k, v in analysis.by_operator().items()}
        total = int(analysis.total())
        unsupported = dict(analysis.unsupported_ops())
        uncalled = sorted(analysis.uncalled_modules())
    return FvcoreCount(sum(by_op.get(k, 0) for k in FVCORE_MAC_OPS), total, by_op, unsupported, uncalled)


# ----- cost tables ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CostTable(Mapping):
    """MACs per cost unit (a Mapping name -> MACs, so ``executed_macs(trace, table)`` works) and per
    forced exit (cumulative, batch 1). ``probes``/``exit_counts`` keep the raw counts."""

    units: dict[str, int | float]
    exits: tuple[int | float, ...]
    baselines: dict[str, str | None]
    probes: dict[str, MacCount]
    exit_counts: tuple[MacCount, ...]
    input_shape: tuple[int, ...]

    def __getitem__(self, name: str) -> int | float:
        return self.units[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def unsupported_ops(self) -> dict[str, int]:
        """Ops without a formula seen in any probe or forced path (name -> most calls in one count)."""
        merged: Counter[str] = Counter()
        for count in list(self.probes.values()) + list(self.exit_counts):
            for name, n in count.unsupported_ops.items():
                merged[name] = max(merged[name], n)
        return dict(merged)


def _check_batch1(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"the cost table needs a batch-1 sample input (shape [1, ...]), got {shape}")


def build_cost_table(model: nn.Module, sample_input: Tensor) -> CostTable:
    """Count every cost unit's probe and every forced exit at batch 1 (eval mode, no grad)."""
    _check_batch1(sample_input)
    x = sample_input.to(model_device(model))
    with eval_mode(model), torch.no_grad():
        units = contract.cost_units(model)
        names = [u.name for u in units]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"cost unit name(s) {dupes} appear more than once in {type(model).__name__}.cost_units()")
        probes = {u.name: count_macs(u.probe, x, module=model) for u in units}
        values: dict[str, int | float] = {}
        for u in units:
            base = 0
            if u.baseline is not None:
                if u.baseline not in probes:
                    raise ValueError(f"cost unit {u.name!r} has baseline {u.baseline!r}, which is not a unit; units: {', '.join(names)}")
                base = probes[u.baseline].total
            macs = probes[u.name].total - base
            if macs < 0:
                raise ValueError(f"cost unit {u.name!r}: its probe ran {probes[u.name].total} MACs, fewer than its "
                                 f"baseline {u.baseline!r} ({base}); the probe must include the baseline's work")
            values[u.name] = macs
        exit_counts = tuple(count_macs(lambda inp, k=k: contract.forced_forward(model, inp, k), x, module=model)
                            for k in range(contract.num_exits(model)))
    return CostTable(values, tuple(c.total for c in exit_counts), {u.name: u.baseline for u in units}, probes,
                     exit_counts, tuple(sample_input.shape))


# ----- expected cost of a dynamic model -----------------------------------------------------------

def trace_histograms(trace: contract.Trace, num_exits: int | None = None, num_experts: int | None = None) -> dict[str, Any]:
    """Exit histogram (bincount of exit_index), gate rates (mean per block) and expert counts
    (bincount per layer; -1 = dropped token, counted apart)."""
    n = len(trace)
    exit_index = trace.exit_index.detach().cpu().long()
    k = max(int(num_exits or 0), int(exit_index.max()) + 1 if n else 1)
    counts = torch.bincount(exit_index, minlength=k).tolist()
    out: dict[str, Any] = {"n": n, "exit_counts": counts, "exit_fractions": [c / n if n else 0.0 for c in counts]}
    if trace.gates is not None:
        gates = trace.gates.detach().cpu().float()
        out["gate_rates"] = gates.mean(0).tolist() if n else [0.0] * gates.shape[1]
    if trace.experts is not None:
        experts = trace.experts.detach().cpu().long()
        e = max(int(num_experts or 0), int(experts.max()) + 1 if experts.numel() else 0)
        per_layer, dropped = [], []
        for layer in range(experts.shape[1]):
            chosen = experts[:, layer].reshape(-1)
            per_layer.append(torch.bincount(chosen[chosen >= 0], minlength=e).tolist())
            dropped.append(int((chosen < 0).sum()))
        out["expert_counts"], out["expert_dropped"] = per_layer, dropped
    return out


@dataclass(frozen=True)
class ExpectedCost:
    """Executed MACs per sample (float64 [N]) with their summary and the trace's histograms."""

    per_sample: Tensor
    summary: Summary
    histograms: dict[str, Any]

    @property
    def mean(self) -> float:
        return self.summary.mean


def expected_macs(trace: contract.Trace, table: Mapping[str, float], num_exits: int | None = None) -> ExpectedCost:
    """Mean (and distribution) over samples of the MACs each sample executed, from the cost table."""
    if len(trace) == 0:
        raise ValueError("expected MACs need a trace of at least one sample")
    per_sample = contract.executed_macs(trace, table)
    if num_exits is None and isinstance(table, CostTable):
        num_exits = len(table.exits)
    return ExpectedCost(per_sample, summarize(per_sample.tolist()), trace_histograms(trace, num_exits))


# ----- oracle ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OracleSample:
    """One sample counted at batch 1 on the real dynamic forward vs the cost table on its trace."""

    index: int
    counted: int | float
    table: float
    exit_index: int
    unsupported_ops: dict[str, int]

    @property
    def agrees(self) -> bool:
        return float(self.counted) == float(self.table)


def pick_samples(n: int, num_samples: int, seed: int = 0) -> list[int]:
    """A reproducible random subset of ``range(n)`` (sorted)."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[: max(0, min(num_samples, n))].tolist())


def oracle_check(model: nn.Module, inputs: Tensor, table: Mapping[str, float], policy: Any = None, *,
                 indices: list[int] | None = None, num_samples: int = 8, seed: int = 0,
                 mode: str = "compact") -> list[OracleSample]:
    """Count samples one by one (batch 1) under FlopCounterMode on ``dynamic_forward`` and compute
    the table-based MACs from the trace of that same call. They must be equal."""
    contract.check_mode(mode)
    if indices is None:
        indices = pick_samples(inputs.shape[0], num_samples, seed)
    bad = [i for i in indices if not 0 <= i < inputs.shape[0]]
    if bad:
        raise ValueError(f"oracle sample indices {bad} are out of range 0..{inputs.shape[0] - 1}")
    device = model_device(model)
    results = []
    with eval_mode(model), torch.no_grad():
        for i in indices:
            x = inputs[i:i + 1].to(device)
            with MacCounter(model) as counter:
                out = contract.dynamic_forward(model, x, policy, mode)
            count = counter.result()
            table_macs = float(contract.executed_macs(out.trace, table)[0])
            results.append(OracleSample(i, count.total, table_macs, int(out.trace.exit_index[0]), count.unsupported_ops))
    return results


# ----- rows -----------------------------------------------------------------------------------------

def parameter_counts(model: nn.Module) -> dict[str, int | None]:
    """Total parameters (shared ones once) and, where the model says, the active ones per sample."""
    total = sum(p.numel() for p in model.parameters())
    active = getattr(model, "active_parameters", None)
    return {"params": int(total), "params_active": int(active()) if callable(active) else None}


def _stats_times(summary: Summary, factor: float) -> dict[str, Any]:
    stats = summary.row_stats()
    return {k: (v * factor if v is not None and k != "n" else v) for k, v in stats.items()}


def expected_cost_rows(trace: contract.Trace, table: CostTable, label: str = "", /, **row_fields: Any) -> list[dict[str, Any]]:
    """expected_macs/expected_flops (distribution), exit_fraction, gate_rate and expert_load rows."""
    cost = expected_macs(trace, table)
    s, hist = cost.summary, cost.histograms
    fields = {**row_fields, "policy": label or row_fields.get("policy", "")}
    detail = {"min": s.min, "max": s.max, "exit_counts": hist["exit_counts"],
              "p99_needs_n": MIN_SAMPLES_P99, "definition": "mean over samples of executed MACs (cost table x trace)"}
    rows = [_row("expected_macs", s.mean, "MACs", fields, **s.row_stats(), detail=detail),
            _row("expected_flops", 2 * s.mean, "FLOPs", fields, **_stats_times(s, 2.0), detail={"min": 2 * s.min, "max": 2 * s.max})]
    if len(table.exits) > 1:
        for k, (frac, count) in enumerate(zip(hist["exit_fractions"], hist["exit_counts"])):
            rows.append(_row("exit_fraction", frac, "fraction", fields, exit=k, n=s.n, detail={"count": count}))
    for g, rate in enumerate(hist.get("gate_rates", [])):
        rows.append(_row("gate_rate", rate, "fraction", fields, n=s.n, detail={"gate": g}))
    for layer, (counts, dropped) in enumerate(zip(hist.get("expert_counts", []), hist.get("expert_dropped", []))):
        tokens = sum(counts) + dropped
        for e, c in enumerate(counts):
            rows.append(_row("expert_load", c / tokens if tokens else 0.0, "fraction", fields, n=tokens,
                             detail={"layer": layer, "expert": e, "count": c, "dropped": dropped}))
    return rows


def cost_rows(model: nn.Module, sample_input: Tensor, traces: contract.Trace | Mapping[str, contract.Trace] | None = None, /, *,
              fvcore: bool = True, include_params: bool = True, table: CostTable | None = None,
              **row_fields: Any) -> list[dict[str, Any]]:
    """Result rows for a model's compute at batch 1 (see the metric names in ``harness.metrics``).

    ``traces``: one Trace (rows get ``policy`` from ``row_fields``) or {policy label: Trace} from
    dynamic inference over a dataset; adds the expected-cost rows. ``table``: a prebuilt cost table.
    """
    table = table or build_cost_table(model, sample_input)
    fields = {**row_fields, "batch_size": 1}
    shape = list(table.input_shape)
    rows: list[dict[str, Any]] = []
    if include_params:
        counts = parameter_counts(model)
        rows.append(_row("params", counts["params"], "count", fields))
        if counts["params_active"] is not None:
            rows.append(_row("params_active", counts["params_active"], "count", fields))
    for k, count in enumerate(table.exit_counts):
        detail = {"input_shape": shape, "path": "forced", "by_operator": count.by_operator,
                  "unsupported_ops": count.unsupported_ops}
        rows.append(_row("macs", count.total, "MACs", fields, exit=k, detail=detail))
        rows.append(_row("flops", count.flops, "FLOPs", fields, exit=k, detail={"input_shape": shape, "definition": "2 x MACs"}))
    for name, macs in table.units.items():
        rows.append(_row("unit_macs", macs, "MACs", fields, detail={
            "cost_unit": name, "baseline": table.baselines[name], "input_shape": shape,
            "unsupported_ops": table.probes[name].unsupported_ops}))
    if fvcore and contract.dynamic_kind(model) == "static":
        rows.append(_fvcore_row(model, sample_input, table.exits[0], fields))
    if traces is not None:
        items = traces.items() if isinstance(traces, Mapping) else [(row_fields.get("policy", ""), traces)]
        for label, trace in items:
            rows.extend(expected_cost_rows(trace, table, label, **fields))
    return rows


def _fvcore_row(model: nn.Module, sample_input: Tensor, harness_macs: float, fields: Mapping[str, Any]) -> dict[str, Any]:
    try:
        fv = fvcore_count(model, sample_input.to(model_device(model)))
    except Exception as exc:  # noqa: BLE001 - a failed cross-check is a row with its error
        return _row("macs_fvcore", None, "MACs", fields, exit=0, error=f"fvcore failed: {type(exc).__name__}: {exc}")
    detail = {"fvcore_total": fv.total, "by_operator": fv.by_operator, "skipped_ops": fv.unsupported_ops,
              "uncalled_modules": fv.uncalled_modules[:50], "harness_macs": harness_macs,
              "ratio_to_harness": fv.macs / harness_macs if harness_macs else None,
              "definition": "fvcore's conv/linear/matmul ops (1 flop = 1 fused multiply-add); fvcore_total adds norms and pooling"}
    return _row("macs_fvcore", fv.macs, "MACs", fields, exit=0, detail=detail)


def oracle_rows(model: nn.Module, inputs: Tensor, table: CostTable, policy: Any = None, /, *, num_samples: int = 8,
                seed: int = 0, mode: str = "compact", **row_fields: Any) -> list[dict[str, Any]]:
    """One row: the largest |counted - table| MACs over a random subset of samples (0 = exact).
    A disagreement fills ``error``."""
    samples = oracle_check(model, inputs, table, policy, num_samples=num_samples, seed=seed, mode=mode)
    worst = max((abs(float(s.counted) - s.table) for s in samples), default=0.0)
    bad = [s for s in samples if not s.agrees]
    error = ""
    if bad:
        error = "oracle mismatch: " + "; ".join(f"sample {s.index} counted {s.counted} vs table {s.table}" for s in bad[:5])
    detail = {"mode": mode, "samples": [{"index": s.index, "counted": s.counted, "table": s.table, "exit": s.exit_index}
                                        for s in samples]}
    label = row_fields.pop("policy", "") or (policy.describe() if hasattr(policy, "describe") else "")
    return [_row("macs_oracle_error", worst, "MACs", row_fields, batch_size=1, policy=label, n=len(samples),
                 detail=detail, error=error)]
