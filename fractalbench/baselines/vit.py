"""Vision transformers sized for CIFAR: ViT-Lite (Hassani et al., "Escaping the Big Data Paradigm with
Compact Transformers", 2021), the ViT of Dosovitskiy et al. (ICLR 2021) with 4x4 patches.

A 32x32 image becomes 64 patch tokens (a 4x4 convolution with stride 4, bias) plus a class token, with a
learnt positional embedding; then ``L`` encoder layers of dimension ``D`` with ``H`` heads and an MLP of
``mlp_ratio * D``; then LayerNorm, the class token, and a linear classifier. The encoder layer is the
one of the authors' code (SHI-Labs/Compact-Transformers ``TransformerEncoderLayer``):
``x = x + DropPath(Attention(LN(x)))``, ``x = LN(x)``, ``x = x + DropPath(MLP(x))`` (pre-norm attention,
the MLP on the normalised stream), qkv without bias, GELU, attention dropout 0.1 and stochastic depth
rising linearly to 0.1 over the layers in training.

Attention is written out as two matrix products (``q @ k^T`` and ``attn @ v``), as in the authors'
code, and counted as such (the harness also counts the fused ``scaled_dot_product_attention`` kernels
that timm's ViTs call). The published MACs of ViT-Lite (0.239 G for
7/4) count the linear layers and the patch convolution only: ``7 x 34,078,720 + 786,432 + 2,560 =
239,340,032``. This build's count adds the attention products, ``7 x 2 x 4 x 65 x 65 x 64 =
15,142,400``, so 254,482,432 per 32x32 image (``tests/baselines/test_vit.py`` checks both).

The model is split into units for the early-exit wrapper (``sdn:vit_lite_7_4``: a classifier on the
class token after every layer, :mod:`fractalbench.baselines.sdn`): ``embed`` (tokens, class token,
positions), every ``blocks[i]``, and ``head`` (LayerNorm, class token, linear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = ("Hassani et al., Escaping the Big Data Paradigm with Compact Transformers, 2021 (ViT-Lite; "
         "after Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021)")


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): in training, a residual branch is dropped for
    each sample with probability ``p`` and the kept ones are scaled by 1 / (1 - p); identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with the two products written out (counted by the MACs counter)."""

    def __init__(self, dim: int, heads: int, attention_dropout: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dimension {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(torch.matmul(q, k.transpose(-2, -1)).mul(self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)))


class EncoderLayer(nn.Module):
    """ViT-Lite's encoder layer (see the module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.1,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, attention_dropout, dropout)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.drop_path(self.self_attn(self.pre_norm(x))))
        return x + self.drop_path(self.dropout2(self.linear2(self.dropout1(F.gelu(self.linear1(x))))))


class TokenEmbedding(nn.Module):
    """Image -> tokens: a ``patch`` x ``patch`` convolution with stride ``patch`` (bias), flattened, a
    class token in front, plus a learnt positional embedding (truncated normal, std 0.2, as ViT-Lite)."""

    def __init__(self, in_chans: int, dim: int, patch: int, img_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch}")
        self.img_size, self.patch = img_size, patch
        self.tokenizer = nn.Conv2d(in_chans, dim, patch, stride=patch, bias=True)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.positions, std=0.2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"this vision transformer was built for {self.img_size}x{self.img_size} inputs "
                             f"(img_size={self.img_size}), got {x.shape[-2]}x{x.shape[-1]}")
        tokens = self.tokenizer(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.dropout(tokens + self.positions)


class ClassTokenHead(nn.Module):
    """LayerNorm, the class token (position 0), a linear classifier. Also ViT exits' head."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x[:, 0]))


class VisionTransformerLite(nn.Module):
    """ViT-Lite-L/P; see the module docstring. ``img_size`` fixes the positional embedding."""

    def __init__(self, depth: int, dim: int, heads: int, mlp_ratio: float, patch: int = 4, img_size: int = 32,
                 num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0, attention_dropout: float = 0.1,
                 stochastic_depth: float = 0.1) -> None:
        super().__init__()
        self.img_size, self.depth, self.dim = img_size, depth, dim
        self.embed = TokenEmbedding(in_chans, dim, patch, img_size, dropout)
        rates = [stochastic_depth * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace
        self.blocks = nn.ModuleList(EncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, attention_dropout, r)
                                    for r in rates)
        self.head = ClassTokenHead(dim, num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """ViT-Lite's initialisation: linear weights truncated normal (std 0.02), biases 0, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


#: The authors' CIFAR-10 configuration (SHI-Labs/Compact-Transformers, configs/datasets/cifar10.yml).
VIT_LITE_RECIPE = {"epochs": 200, "batch_size": 128, "optimizer": "adamw", "lr": 5.5e-4, "weight_decay": 0.06,
                   "schedule": "cosine", "warmup_epochs": 10, "precision": "bf16"}
VIT_LITE_RECIPE_NOTE = (
    "the authors' repository (configs/datasets/cifar10.yml, timm's training script): AdamW lr 5.5e-4 with a "
    "linear warm-up from 1e-5 over 10 epochs, cosine to 1e-5, weight decay 0.06, batch 128, mixed precision, "
    "label smoothing 0.1, RandAugment (rand-m9-mstd0.5-inc1), mixup 0.8 and CutMix 1.0 (off for the last 25 "
    "epochs), random erasing 0.25, random-resized crops of 80-100 %, 10 cool-down epochs; the README's "
    "ViT-Lite rows are trained for 200 epochs (the config file says 300, for CCT)")
VIT_LITE_SOURCE = (
    "CIFAR-10/100 top-1, parameters and MACs: the authors' README table (SHI-Labs/Compact-Transformers; "
    "ViT-Lite-7/4: 91.38 / 69.75 %, 3.717 M, 0.239 G; ViT-Lite-6/4: 90.94 / 69.20 %, 3.191 M, 0.205 G). "
    "Their MACs omit the two attention products (this harness counts them: 254.5 M for 7/4, 218.2 M for 6/4)")


def _card(top1: float, top1_c100: float, params: float, macs: float, input_size: int = 32) -> ModelCard:
    return ModelCard(family="vit", paper=PAPER, input_size=input_size,
                     reference={"params": params, "macs": macs, "top1_cifar10": top1, "top1_cifar100": top1_c100},
                     reference_source=VIT_LITE_SOURCE, paper_recipe=recipe_text(VIT_LITE_RECIPE, VIT_LITE_RECIPE_NOTE),
                     notes="attention as two matmuls, as the authors' code; their MACs are counted here, "
                     "the published MACs leave them out")


@register_model(card=_card(91.38, 69.75, 3.717e6, 0.239e9))
def vit_lite_7_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> VisionTransformerLite:
    return VisionTransformerLite(7, 256, 4, 2.0, 4, img_size, num_classes, in_chans)


@register_model(card=_card(90.94, 69.20, 3.191e6, 0.205e9))
def vit_lite_6_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> VisionTransformerLite:
    return VisionTransformerLite(6, 256, 4, 2.0, 4, img_size, num_classes, in_chans)


@register_model(card=ModelCard(
    family="vit", paper=PAPER, input_size=16, reference_source="no published numbers at this size",
    notes="ViT-Lite-2/4 of the authors' code (2 layers, 2 heads, dimension 128, MLP ratio 1) at 16x16 "
          "(16 patch tokens): the size for the digits suites"))
def vit_lite_2_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 16) -> VisionTransformerLite:
    return VisionTransformerLite(2, 128, 2, 1.0, 4, img_size, num_classes, in_chans)
