"""Sparse attention on long sequences: the Long Range Arena image task (Tay et al., "Long Range Arena: A
Benchmark for Efficient Transformers", ICLR 2021): CIFAR-10 as a sequence of 1,024 grayscale pixels,
classified by a small transformer encoder with full attention, Longformer-style attention (Beltagy et
al. 2020: a sliding window plus global tokens) or BigBird-style attention (Zaheer et al., NeurIPS
2020: window, global and random blocks).

Input: a normal image batch [N, C, H, W] (the harness's CIFAR-10); the model takes its grayscale
(ITU-R 601 weights, as ``tf.image.rgb_to_grayscale``; a one-channel input is taken as it is) and reads
it as a sequence of H x W pixels, each embedded by a linear map of its intensity (LRA looks up one of
256 embeddings per 8-bit value; this copy of CIFAR-10 arrives normalised, so a continuous embedding)
plus a learnt position embedding. Then ``depth`` pre-norm encoder layers (attention with ``heads``
heads of total width ``qkv_dim``, an MLP of ``mlp_dim``), a final LayerNorm, the mean over the
sequence and a linear classifier.

Block-sparse attention really computes only its blocks. The sequence is cut into blocks of
``block`` tokens. Every query block gathers the key/value blocks of its pattern and attends to them
only, so the two attention products cost ``2 x (blocks in the pattern) x block x block x qkv_dim``
multiply-adds per query block instead of ``2 x n x block x qkv_dim``:

- ``longformer``: the ``window`` blocks on each side of the query block and itself, plus the
  ``globals`` first blocks (global tokens: they attend to every key, and every query attends to
  them);
- ``bigbird``: the same window (BigBird's 3 blocks: ``window=1``), the global blocks, and ``random``
  further blocks per query block, drawn once at construction from a fixed seed (BigBird's ITC
  variant; a query block's random blocks avoid its window and the global blocks).

Blocks of a query that fall outside the sequence are not gathered (the first and last query blocks
have fewer window blocks), so the count is exact: :func:`attention_macs` is the hand formula the
tests and the benchmark check against the counted MACs.
"""
from __future__ import annotations

import math
import random as pyrandom

import torch
from torch import Tensor, nn

from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = "Tay et al., Long Range Arena: A Benchmark for Efficient Transformers, ICLR 2021 (image task)"
ATTENTIONS = ("full", "longformer", "bigbird")
GRAY = (0.2989, 0.5870, 0.1140)


def block_pattern(num_blocks: int, attention: str, window: int = 1, globals_: int = 1, random: int = 0,
                  seed: int = 0) -> list[list[int]]:
    """Key blocks of every query block (sorted, distinct). ``full``: all. Global query blocks attend to
    every block; other query blocks to their window, the global blocks and (BigBird) ``random`` others."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
    every = list(range(num_blocks))
    if attention == "full":
        return [every for _ in every]
    draw = pyrandom.Random(seed)  # plain Python: the pattern is the same on any device (meta included)
    pattern = []
    for q in every:
        if q < globals_:
            pattern.append(every)
            continue
        keys = {k for k in range(q - window, q + window + 1) if 0 <= k < num_blocks} | set(range(min(globals_,
                                                                                                      num_blocks)))
        if attention == "bigbird" and random > 0:
            others = [k for k in every if k not in keys]
            if others:
                keys |= set(draw.sample(others, min(random, len(others))))
        pattern.append(sorted(keys))
    return pattern


def attention_macs(seq_len: int, qkv_dim: int, attention: str, block: int = 64, window: int = 1, globals_: int = 1,
                   random: int = 0, seed: int = 0) -> int:
    """Multiply-adds of the two attention products (scores and weighted values) for one sequence:
    ``2 x qkv_dim x sum over query blocks of (query block length x gathered key tokens)``."""
    if attention == "full":
        return 2 * seq_len * seq_len * qkv_dim
    num_blocks = math.ceil(seq_len / block)
    sizes = [min(block, seq_len - b * block) for b in range(num_blocks)]
    pattern = block_pattern(num_blocks, attention, window, globals_, random, seed)
    return 2 * qkv_dim * sum(sizes[q] * sum(sizes[k] for k in keys) for q, keys in enumerate(pattern))


class BlockSparseAttention(nn.Module):
    """Multi-head self-attention over [N, L, D] with a block pattern (see the module docstring)."""

    def __init__(self, dim: int, qkv_dim: int, heads: int, seq_len: int, attention: str = "full", block: int = 64,
                 window: int = 1, globals_: int = 1, random: int = 0, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if qkv_dim % heads:
            raise ValueError(f"qkv_dim {qkv_dim} is not divisible by {heads} heads")
        self.heads, self.qkv_dim, self.seq_len, self.attention, self.block = heads, qkv_dim, seq_len, attention, block
        self.qkv = nn.Linear(dim, 3 * qkv_dim)
        self.out = nn.Linear(qkv_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.scale = (qkv_dim // heads) ** -0.5
        num_blocks = math.ceil(seq_len / block)
        self.pattern = block_pattern(num_blocks, attention, window, globals_, random, seed)
        self.window, self.globals_, self.random, self.seed = window, globals_, random, seed

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        if length != self.seq_len:
            raise ValueError(f"this attention was built for sequences of {self.seq_len}, got {length}")
        h, d = self.heads, self.qkv_dim // self.heads
        q, k, v = self.qkv(x).reshape(n, length, 3, h, d).permute(2, 0, 3, 1, 4)  # each [N, H, L, d]
        if self.attention == "full":
            weights = self.drop(torch.matmul(q, k.transpose(-2, -1)).mul(self.scale).softmax(-1))
            y = torch.matmul(weights, v)
        else:
            y = torch.empty_like(q)
            for batched, group, keys in self._groups():
                rows = torch.cat([self._tokens(b) for b in group])
                if batched:  # whole query blocks with the same number of whole key blocks: one product
                    y[:, :, rows] = self._batched(q, k, v, group, keys)
                    continue
                cols = torch.cat([self._tokens(b) for b in keys])
                kg, vg = k[:, :, cols], v[:, :, cols]
                w = self.drop(torch.matmul(q[:, :, rows], kg.transpose(-2, -1)).mul(self.scale).softmax(-1))
                y[:, :, rows] = torch.matmul(w, vg)
        return self.out(y.transpose(1, 2).reshape(n, length, self.qkv_dim))

    def _tokens(self, b: int) -> Tensor:
        return torch.arange(b * self.block, min((b + 1) * self.block, self.seq_len))

    def _groups(self) -> list[tuple[bool, list[int], list]]:
        """(batched, query blocks, keys): global and partial query blocks alone (keys: their key blocks),
        the other whole blocks together when their key lists have the same length (keys: one list of
        key blocks per query block)."""
        if not hasattr(self, "_cached_groups"):
            length, groups, batchable = self.seq_len, [], {}
            for qb, keys in enumerate(self.pattern):
                whole = (qb + 1) * self.block <= length and all((kb + 1) * self.block <= length for kb in keys)
                if qb < self.globals_ or not whole:
                    groups.append((False, [qb], keys))
                else:
                    batchable.setdefault(len(keys), []).append(qb)
            for blocks in batchable.values():
                groups.append((True, blocks, [self.pattern[b] for b in blocks]))
            self._cached_groups = groups
        return self._cached_groups

    def _batched(self, q: Tensor, k: Tensor, v: Tensor, blocks: list[int], keys: list[list[int]]) -> Tensor:
        """Query blocks ``blocks`` (whole, each with len(keys[i]) whole key blocks) in one product."""
        n, h, length, d = q.shape
        b = self.block
        qb = q[:, :, : (length // b) * b].reshape(n, h, length // b, b, d)[:, :, blocks]  # [N, H, G, b, d]
        index = torch.tensor(keys)  # [G, K]
        kb = k[:, :, : (length // b) * b].reshape(n, h, length // b, b, d)[:, :, index].flatten(3, 4)  # [N,H,G,Kb,d]
        vb = v[:, :, : (length // b) * b].reshape(n, h, length // b, b, d)[:, :, index].flatten(3, 4)
        w = self.drop(torch.matmul(qb, kb.transpose(-2, -1)).mul(self.scale).softmax(-1))
        return torch.matmul(w, vb).flatten(2, 3)  # [N, H, G*b, d]


class EncoderLayer(nn.Module):
    """Pre-norm: x + Attention(LN(x)), then x + MLP(LN(x)) (GELU), dropout after each."""

    def __init__(self, dim: int, mlp_dim: int, attention: BlockSparseAttention, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class PixelSequenceTransformer(nn.Module):
    """The LRA image-task classifier (see the module docstring)."""

    def __init__(self, attention: str = "full", *, num_classes: int = 10, in_chans: int = 3, seq_len: int = 1024,
                 dim: int = 32, qkv_dim: int = 32, mlp_dim: int = 64, heads: int = 1, depth: int = 1,
                 block: int = 64, window: int = 1, globals_: int = 1, random: int = 0, seed: int = 0,
                 dropout: float = 0.3, attention_dropout: float = 0.2) -> None:
        super().__init__()
        self.in_chans, self.seq_len, self.attention = in_chans, seq_len, attention
        self.config = {"num_classes": num_classes, "in_chans": in_chans, "dim": dim, "qkv_dim": qkv_dim,
                       "mlp_dim": mlp_dim, "heads": heads, "depth": depth, "block": block, "window": window,
                       "globals_": globals_, "random": random, "seed": seed, "dropout": dropout,
                       "attention_dropout": attention_dropout}
        self.embed = nn.Linear(1, dim)
        self.positions = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, mlp_dim, BlockSparseAttention(dim, qkv_dim, heads, seq_len, attention, block, window,
                                                            globals_, random, seed + i, attention_dropout), dropout)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def pixels(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> grayscale pixel sequence [N, H*W, 1]."""
        if x.shape[1] == 3:
            x = (x * x.new_tensor(GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] != 1:
            raise ValueError(f"expected 1 or 3 input channels, got {x.shape[1]}")
        seq = x.flatten(2).transpose(1, 2)
        if seq.shape[1] != self.seq_len:
            raise ValueError(f"this model reads {self.seq_len} pixels (seq_len={self.seq_len}), got "
                             f"{x.shape[-2]}x{x.shape[-1]} = {seq.shape[1]}")
        return seq

    def at_length(self, seq_len: int) -> dict[str, PixelSequenceTransformer]:
        """This configuration at another sequence length, freshly initialised, and (for a sparse
        attention) the same configuration with full attention: the variants whose cost against
        length :mod:`fractalbench.harness.metrics.length_scaling` measures."""
        variants = {self.attention: PixelSequenceTransformer(self.attention, seq_len=seq_len, **self.config)}
        if self.attention != "full":
            variants["full"] = PixelSequenceTransformer("full", seq_len=seq_len, **self.config)
        return variants

    def length_input(self, seq_len: int) -> Tensor:
        """One sample of ``seq_len`` pixels: a one-channel 1 x seq_len image (any length, square or not)."""
        return torch.randn(1, 1, 1, seq_len, generator=torch.Generator().manual_seed(seq_len))

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.embed(self.pixels(x)) + self.positions)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


#: LRA's image-task training (lra_benchmarks/image/configs/cifar10/base_cifar10_config.py).
LRA_RECIPE = {"epochs": 200, "batch_size": 256, "optimizer": "adam", "lr": 5e-4, "weight_decay": 0.0,
              "schedule": "cosine", "warmup_epochs": 1}
LRA_NOTE = ("the LRA repository's base config: Adam lr 5e-4, linear warm-up of 1 epoch then cosine decay, batch "
            "256, 200 epochs of the 45,000 training images, no weight decay, dropout 0.3, attention dropout 0.2; "
            "8-bit grayscale pixels looked up in a 256-entry embedding")
LRA_TABLE1 = {"full": 42.44, "longformer": 42.22, "bigbird": 40.83}


def _card(attention: str, config: str) -> ModelCard:
    return ModelCard(
        family="sparse_attention", paper=PAPER, input_size=32,
        reference={"top1_lra_image": LRA_TABLE1[attention]},
        reference_source="LRA Table 1, Image column (Transformer 42.44, Longformer 42.22, BigBird 40.83 %; on the "
                         "original CIFAR-10, whose test images are PNG-exact; this harness's copy is JPEG)",
        notes=f"LRA's {attention} config for the image task ({config}); mean pooling; continuous pixel embedding "
              "(LRA: 256-entry lookup)",
        paper_recipe=recipe_text(LRA_RECIPE, LRA_NOTE))


@register_model(card=_card("full", "1 layer, dimension 32, 1 head, qkv 32, MLP 64"))
def lra_transformer(*, num_classes: int = 10, in_chans: int = 3, seq_len: int = 1024) -> PixelSequenceTransformer:
    return PixelSequenceTransformer("full", num_classes=num_classes, in_chans=in_chans, seq_len=seq_len)


@register_model(card=_card("longformer", "4 layers, dimension 128, 4 heads, qkv 64, MLP 128; blocks of 64, a window "
                                         "of one block on each side, the first block global"))
def lra_longformer(*, num_classes: int = 10, in_chans: int = 3, seq_len: int = 1024) -> PixelSequenceTransformer:
    return PixelSequenceTransformer("longformer", num_classes=num_classes, in_chans=in_chans, seq_len=seq_len,
                                    dim=128, qkv_dim=64, mlp_dim=128, heads=4, depth=4, block=64)


@register_model(card=_card("bigbird", "1 layer, dimension 128, 4 heads, qkv 64, MLP 128; blocks of 64: 3 window "
                                      "blocks, 1 global block, 3 random blocks per query block"))
def lra_bigbird(*, num_classes: int = 10, in_chans: int = 3, seq_len: int = 1024) -> PixelSequenceTransformer:
    return PixelSequenceTransformer("bigbird", num_classes=num_classes, in_chans=in_chans, seq_len=seq_len,
                                    dim=128, qkv_dim=64, mlp_dim=128, heads=4, depth=1, block=64, random=3)


def dense_equivalent(model: PixelSequenceTransformer) -> PixelSequenceTransformer:
    """The same weights with full attention (for the equality of a pattern that covers every block)."""
    clone = PixelSequenceTransformer("full", num_classes=model.head.out_features, seq_len=model.seq_len,
                                     dim=model.embed.out_features, qkv_dim=model.layers[0].attn.qkv_dim,
                                     mlp_dim=model.layers[0].mlp[0].out_features, heads=model.layers[0].attn.heads,
                                     depth=len(model.layers))
    clone.load_state_dict(model.state_dict())
    return clone.eval()


