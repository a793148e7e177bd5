"""Absolute position embeddings of the backbone feature map (DETR, Sec. 3.2 and appendix A.4).

Both embeddings map a padding mask (B, h, w) to (B, hidden_dim, h, w): the first half of the
channels encodes the row (y), the second half the column (x) — for the sine version; the learned
version puts the column first, as published DETR does.
"""
import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of the normalised pixel coordinates, as in "Attention is all you need"
    generalised to 2-D. Coordinates count only valid (unpadded) pixels, so padding does not shift
    the embedding of the image content.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, C, h, w) features (unused apart from the interface); mask: (B, h, w) bool,
        True on padding. Returns (B, 2 * num_pos_feats, h, w) float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # Published DETR divides by the last valid coordinate without subtracting 0.5.
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # sin on even features, cos on odd ones, interleaved
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """One learned vector per row and per column (feature maps up to 50 x 50)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, C, h, w) features; mask ignored. Returns (B, 2 * num_pos_feats, h, w):
        column embedding in the first half of the channels, row embedding in the second."""
        h, w = x.shape[-2:]
        x_emb = self.col_embed(torch.arange(w, device=x.device))  # (w, F)
        y_emb = self.row_embed(torch.arange(h, device=x.device))  # (h, F)
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1),
                         y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)  # (h, w, 2F)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)


def build_position_encoding(args):
    """'sine' | 'learned' -> module producing (B, hidden_dim, h, w); 'none' -> None."""
    num_pos_feats = args.hidden_dim // 2
    if args.position_embedding == 'sine':
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if args.position_embedding == 'learned':
        return PositionEmbeddingLearned(num_pos_feats)
    if args.position_embedding == 'none':
        return None
    raise ValueError(f"--position_embedding {args.position_embedding!r} is not supported; "
                     "expected 'sine', 'learned' or 'none'")
