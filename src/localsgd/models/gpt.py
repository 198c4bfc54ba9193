"""Decoder-only transformer language model (GPT-2 layout with optional rotary positions).

Pre-norm blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))``; causal attention through
``F.scaled_dot_product_attention(is_causal=True)`` so the fused kernels are used wherever the
backend has them; a final LayerNorm and an output head that shares the token embedding.

The model owns parameters only, no buffers: the rotary cos/sin tables are recomputed in every
forward pass from the sequence length (a few thousand elements, negligible next to attention).
Buffers would be broadcast by engines and averaged (or compressed) by the sync code on every
round like BatchNorm statistics, and would be cast by ``model.double()`` after being computed
in a lower precision; a state_dict here holds exactly the trainable tensors.

Initialisation follows GPT-2: every linear and embedding weight ~ N(0, 0.02), biases zero,
LayerNorm weight one, and the two projections that write into the residual stream per block
(attention output, MLP output) ~ N(0, 0.02 / sqrt(2 * depth)), so the residual stream's
variance at the output does not grow with depth. Only the global torch RNG is used, so seeding
before construction yields identical replicas on every worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02
ROPE_BASE = 10000.0
POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class GPTShape:
    """Width, depth and attention heads of a named model size."""

    width: int
    """Residual stream width (embedding dimension)."""
    depth: int
    """Number of transformer blocks."""
    heads: int
    """Attention heads per block; ``width`` must be divisible by it."""


# Parameter counts (tied embeddings, no biases, rotary positions) at vocab 256:
# gpt_tiny 820,352; gpt_mini 10,720,128; gpt2_124m 85,150,464 (with biases, learned positions
# at vocab 50257 and context 1024 the last is GPT-2 small's 124,439,808).
GPT_SIZES: dict[str, GPTShape] = {
    "gpt_tiny": GPTShape(width=128, depth=4, heads=4),
    "gpt_mini": GPTShape(width=384, depth=6, heads=6),
    "gpt2_124m": GPTShape(width=768, depth=12, heads=12),
}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars; a tensor shared by several modules counts once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two parameter groups for ``torch.optim.AdamW``: matrices (linear and embedding
    weights) with ``weight_decay``, vectors (LayerNorm weights, biases) without, as GPT-2
    style training does; each tensor, tied ones included, appears once."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def rope_tables(
    seq_len: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each ``[seq_len, head_dim // 2]``.

    Computed in at least float32: bf16 angles for positions in the hundreds would be off by
    whole radians.
    """
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = ROPE_BASE ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=work) / head_dim
    )
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=work), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (i, i + head_dim/2) of ``x`` ``[B, H, T, head_dim]`` by position."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, width: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.proj.residual_out = True  # type: ignore[assignment]
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        # [B, T, C] -> [B, H, T, head_dim]
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: width -> mlp_ratio * width -> width, GELU."""

    def __init__(self, width: int, mlp_ratio: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, mlp_ratio * width, bias=bias)
        self.proj = nn.Linear(mlp_ratio * width, width, bias=bias)
        self.proj.residual_out = True  # type: ignore[assignment]
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=bias)
        self.attn = CausalSelfAttention(width, heads, dropout, bias)
        self.ln2 = nn.LayerNorm(width, bias=bias)
        self.mlp = MLP(width, mlp_ratio, dropout, bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids ``[B, T]`` (T <= context) -> next-token logits ``[B, T, vocab_size]``."""

    def __init__(
        self,
        vocab_size: int,
        context: int,
        width: int,
        depth: int,
        heads: int,
        positions: str = "rope",
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
        bias: bool = False,
    ) -> None:
        super().__init__()
        _check_shape(vocab_size, context, width, depth, heads, positions, dropout, mlp_ratio)
        self.vocab_size = vocab_size
        self.context = context
        self.depth = depth
        self.head_dim = width // heads
        self.positions = positions
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(context, width) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, dropout, bias) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.reset_parameters()
        if tie_embeddings:
            # One tensor, so optimisers, averaging and state_dict see it once per model.
            self.head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (see the module docstring); draws from the global RNG."""
        residual_std = INIT_STD / math.sqrt(2 * self.depth)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = residual_std if getattr(m, "residual_out", False) else INIT_STD
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model context {self.context}")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        else:
            rope = rope_tables(t, self.head_dim, idx.device, x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.ln_f(x))


def gpt_from_size(
    size: str, vocab_size: int, context: int, **options: object
) -> GPT:
    """A :class:`GPT` of the named :data:`GPT_SIZES` shape; ``options`` go to the constructor."""
    if size not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {size!r}; choose one of {sorted(GPT_SIZES)}")
    shape = GPT_SIZES[size]
    return GPT(vocab_size, context, shape.width, shape.depth, shape.heads, **options)  # type: ignore[arg-type]


def _check_shape(
    vocab_size: int,
    context: int,
    width: int,
    depth: int,
    heads: int,
    positions: str,
    dropout: float,
    mlp_ratio: int,
) -> None:
    """ValueError listing every inconsistent argument at once."""
    problems = [
        f"{name} must be positive, got {value}"
        for name, value in (("vocab_size", vocab_size), ("context", context), ("width", width),
                            ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio))
        if value < 1
    ]
    if positions not in POSITIONS:
        problems.append(f"positions must be one of {POSITIONS}, got {positions!r}")
    if heads >= 1 and width % heads:
        problems.append(f"width {width} is not divisible by heads {heads}")
    elif heads >= 1 and positions == "rope" and (width // heads) % 2:
        problems.append(f"rotary positions need an even head size, got {width}/{heads}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {dropout}")
    if problems:
        raise ValueError("invalid GPT shape: " + "; ".join(problems))
