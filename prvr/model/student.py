"""The DL-DKD++ student: two independent frame-level branches (method spec §3.1, §5.2).

Each branch (``inheritance``, ``exploration``) has its own query encoder and its own video
encoder; no parameter is shared between branches (DL-DKD++; the ICCV version shared the
query input projection).

Query encoder:  tokens (Nq, Lq, Dq) → input projection → learned positions (``max_desc_l``
slots) → one attention block (masked) → attention pooling → (Nq, H).
Video encoder:  frames (B, L, Dv) → input projection → learned positions (``max_ctx_l``
slots) → one attention block (masked) → Linear(H, H) → (B, L, H).

The "attention block" is BERT's attention sub-layer only (self-attention, output dense,
dropout, residual, LayerNorm); there is no feed-forward sub-layer. Every LayerNorm module is
an attribute named ``LayerNorm`` so that the reference's weight-decay rule (no decay for
names containing ``bias`` or ``LayerNorm.weight``, see :func:`prvr.optim.param_groups`)
applies by name.

Parameter names look like ``inheritance.video_input_proj.linear.weight``,
``exploration.query_encoder.LayerNorm.weight``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BRANCHES = ("inheritance", "exploration")

#: Additive attention-score penalty of padded keys (BERT convention, as in the reference).
ATTENTION_MASK_VALUE = -10000.0
#: Fill value of padded tokens before the pooling softmax (reference ``mask_logits``).
POOL_MASK_VALUE = -1e10


class InputProjection(nn.Module):
    """LayerNorm(in) → Dropout → Linear(in, out) → ReLU, applied on the last axis."""

    def __init__(self, in_dim: int, out_dim: int, drop: float):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(drop)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.linear(self.dropout(self.LayerNorm(x))))


class PositionalEncoding(nn.Module):
    """Adds a learned position embedding, then LayerNorm and Dropout."""

    def __init__(self, max_len: int, hidden: int, drop: float):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, L, H) → (N, L, H)."""
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions)))


class AttentionBlock(nn.Module):
    """Multi-head self-attention sub-layer with residual and LayerNorm (no feed-forward).

    scores = QKᵀ/√(H/heads) + (-10000 on padded keys) → softmax → Dropout(drop) → ·V →
    concat heads → Linear(H, H) → Dropout(drop) → + input → LayerNorm.
    """

    def __init__(self, hidden: int, n_heads: int, drop: float):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = hidden // n_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(drop)
        self.dense = nn.Linear(hidden, hidden)
        self.out_dropout = nn.Dropout(drop)
        self.LayerNorm = nn.LayerNorm(hidden)

    def _heads(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.n_heads, self.head_dim).transpose(1, 2)  # (N, heads, L, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (N, L, H), mask (N, L) bool (True = real) → (N, L, H)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (N, heads, L, L)
        scores = scores + (~mask)[:, None, None, :].to(scores.dtype) * ATTENTION_MASK_VALUE
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(x.shape)  # (N, L, H)
        return self.LayerNorm(self.out_dropout(self.dense(context)) + x)


class Branch(nn.Module):
    """One branch of the student: a query encoder and a video encoder (§5.2)."""

    def __init__(self, video_dim: int, query_dim: int, hidden: int, n_heads: int, drop: float,
                 input_drop: float, max_ctx_l: int, max_desc_l: int):
        super().__init__()
        self.query_input_proj = InputProjection(query_dim, hidden, input_drop)
        self.query_pos_embed = PositionalEncoding(max_desc_l, hidden, input_drop)
        self.query_encoder = AttentionBlock(hidden, n_heads, drop)
        self.query_pool = nn.Linear(hidden, 1, bias=False)
        self.video_input_proj = InputProjection(video_dim, hidden, input_drop)
        self.video_pos_embed = PositionalEncoding(max_ctx_l, hidden, input_drop)
        self.video_encoder = AttentionBlock(hidden, n_heads, drop)
        self.video_output = nn.Linear(hidden, hidden)

    def encode_query(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens (Nq, Lq, Dq), mask (Nq, Lq) bool → pooled query vectors (Nq, H)."""
        h = self.query_encoder(self.query_pos_embed(self.query_input_proj(tokens)), mask)
        logits = self.query_pool(h).squeeze(-1).masked_fill(~mask, POOL_MASK_VALUE)  # (Nq, Lq)
        weights = torch.softmax(logits, dim=-1)
        return torch.einsum("nl,nlh->nh", weights, h)

    def encode_video(self, frames: Tensor, mask: Tensor) -> Tensor:
        """frames (B, L, Dv), mask (B, L) bool → frame features (B, L, H)."""
        h = self.video_encoder(self.video_pos_embed(self.video_input_proj(frames)), mask)
        return self.video_output(h)


class DLDKDStudent(nn.Module):
    """Dual-branch DL-DKD++ student (method spec §5.2).

    Args:
        video_dim: student video feature size D_v (3072 for TVR i3d_resnet, 1024 otherwise).
        query_dim: token feature size D_q (768 for TVR RoBERTa, 1024 otherwise).
        hidden: hidden size H of every branch.
        n_heads: attention heads.
        drop: dropout on attention probabilities and on the attention output.
        input_drop: dropout of the input projections and of the positional encodings.
        max_ctx_l: number of video position slots (longest video, in rows).
        max_desc_l: number of query position slots (longest query, in tokens).
        initializer_range: std of the N(0, std) init of every Linear/Embedding weight.
        branches: which branches to build, a non-empty subset of :data:`BRANCHES`.

    With the defaults the model has 5,755,392 parameters for (3072, 768) and 4,371,968 for
    (1024, 1024) (method spec §5.2).
    """

    def __init__(self, video_dim: int, query_dim: int, hidden: int = 384, n_heads: int = 4,
                 drop: float = 0.2, input_drop: float = 0.2, max_ctx_l: int = 128,
                 max_desc_l: int = 30, initializer_range: float = 0.02,
                 branches: tuple[str, ...] = BRANCHES):
        super().__init__()
        branches = tuple(branches)
        unknown = [b for b in branches if b not in BRANCHES]
        if not branches or unknown or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {branches}")
        self.branches = tuple(b for b in BRANCHES if b in branches)  # canonical order
        self.video_dim, self.query_dim, self.hidden = video_dim, query_dim, hidden
        self.max_ctx_l, self.max_desc_l = max_ctx_l, max_desc_l
        self.initializer_range = initializer_range
        for name in self.branches:
            self.add_module(name, Branch(video_dim, query_dim, hidden, n_heads, drop, input_drop,
                                         max_ctx_l, max_desc_l))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def branch(self, name: str) -> Branch:
        return getattr(self, name)

    @staticmethod
    def _check(x: Tensor, mask: Tensor, dim: int, max_len: int, what: str) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"{what}: expected features of shape (N, L, {dim}), got {tuple(x.shape)}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{what}: mask shape {tuple(mask.shape)} does not match features {tuple(x.shape[:2])}")
        if x.shape[1] > max_len:
            raise ValueError(f"{what}: length {x.shape[1]} exceeds the {max_len} position slots of the model")
        return mask.bool()

    def encode_query(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Encode queries with every branch.

        Args:
            tokens: (Nq, Lq, Dq) token features, zero-padded.
            mask: (Nq, Lq), true/1 for real tokens.

        Returns:
            {branch: (Nq, H)} pooled query vectors (not normalised).
        """
        mask = self._check(tokens, mask, self.query_dim, self.max_desc_l, "query tokens")
        return {b: self.branch(b).encode_query(tokens, mask) for b in self.branches}

    def encode_video(self, frames: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Encode videos with every branch.

        Args:
            frames: (B, L, Dv) frame features, zero-padded.
            mask: (B, L), true/1 for real frames.

        Returns:
            {branch: (B, L, H)} frame features (not normalised; padded rows are not zeroed).
        """
        mask = self._check(frames, mask, self.video_dim, self.max_ctx_l, "video frames")
        return {b: self.branch(b).encode_video(frames, mask) for b in self.branches}

    def forward(self, frames: Tensor, frame_mask: Tensor, tokens: Tensor,
                token_mask: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(encode_query(tokens, token_mask), encode_video(frames, frame_mask))."""
        return self.encode_query(tokens, token_mask), self.encode_video(frames, frame_mask)
