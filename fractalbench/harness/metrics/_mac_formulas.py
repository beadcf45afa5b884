"""Layer 1 of :mod:`fractalbench.harness.metrics.flops`: the per-operator MAC formulas torch's flop registry lacks
(:data:`EXTRA_FORMULAS`, FLOPs = 2 x MACs) and the allowlist of ops that cost 0 MACs by definition
(:data:`ZERO_MAC_OPS`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

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

#: Categories whose ops are free in their in-place form too (``bitwise_and_``, ``mul_``, ``eq_``, ...).
IN_PLACE_TOO = ("element-wise arithmetic and comparisons", "activations and softmax")

ZERO_MAC_OPS: frozenset[str] = (frozenset(f"aten.{name}" for names in ZERO_MAC_CATEGORIES.values() for name in names)
                                | frozenset(f"aten.{name}_" for category in IN_PLACE_TOO
                                            for name in ZERO_MAC_CATEGORIES[category] if not name.endswith("_"))
                                | frozenset({"prim.layout", "prim.device"}))


def _op_name(func: Any) -> str:
    """'aten.convolution' for any overload of aten::convolution; a higher-order op's own name."""
    packet = getattr(func, "_overloadpacket", func)
    qualified = getattr(packet, "_qualified_op_name", None)
    if qualified:
        return qualified.replace("::", ".")
    return str(getattr(packet, "__name__", None) or packet)
