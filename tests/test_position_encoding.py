"""Position embeddings of the feature map: DETR's sine formula and learned row/column tables."""
import math
from types import SimpleNamespace

import pytest
import torch

from detr_irpe.position_encoding import (PositionEmbeddingLearned, PositionEmbeddingSine,
                                         build_position_encoding)


def args(kind, hidden_dim=16):
    return SimpleNamespace(position_embedding=kind, hidden_dim=hidden_dim)


def padded_mask():
    """Image 0 fills the 4 x 5 map; image 1 is 3 x 3 with padding below and to the right."""
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 3:] = True
    return mask


def sine_by_formula(mask, num_pos_feats, temperature=10000.0, scale=2 * math.pi, eps=1e-6):
    """Direct loop: channel k < F encodes y, k >= F encodes x; sin on even k, cos on odd k of
    coord / temperature^(2 floor(k/2) / F), coord = count of valid pixels up to here in the
    column (y) or row (x), divided by the count over the whole column/row, times scale."""
    B, h, w = mask.shape
    F = num_pos_feats
    out = torch.zeros(B, 2 * F, h, w, dtype=torch.float64)
    valid = (~mask).tolist()
    for b in range(B):
        for i in range(h):
            for j in range(w):
                y = sum(valid[b][r][j] for r in range(i + 1))
                y_total = sum(valid[b][r][j] for r in range(h))
                x = sum(valid[b][i][c] for c in range(j + 1))
                x_total = sum(valid[b][i][c] for c in range(w))
                coords = (y / (y_total + eps) * scale, x / (x_total + eps) * scale)
                for half, coord in enumerate(coords):
                    for k in range(F):
                        arg = coord / temperature ** (2 * (k // 2) / F)
                        out[b, half * F + k, i, j] = math.sin(arg) if k % 2 == 0 else math.cos(arg)
    return out


def test_sine_matches_formula_with_padding():
    mask = padded_mask()
    features = torch.randn(2, 7, 4, 5)
    pos = build_position_encoding(args('sine', hidden_dim=16))(features, mask)
    assert pos.shape == (2, 16, 4, 5) and pos.dtype == torch.float32
    torch.testing.assert_close(pos.double(), sine_by_formula(mask, 8), atol=1e-5, rtol=0)


def test_sine_of_image_content_does_not_depend_on_padding():
    embed = PositionEmbeddingSine(num_pos_feats=8)
    mask = padded_mask()
    alone = embed(torch.zeros(1, 1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.bool))
    padded = embed(torch.zeros(2, 1, 4, 5), mask)
    torch.testing.assert_close(padded[1:, :, :3, :3], alone)


def test_sine_has_no_parameters():
    assert len(build_position_encoding(args('sine')).state_dict()) == 0


def test_learned_puts_column_then_row_embedding():
    embed = build_position_encoding(args('learned', hidden_dim=16))
    assert isinstance(embed, PositionEmbeddingLearned)
    assert {k: tuple(v.shape) for k, v in embed.state_dict().items()} == {
        'row_embed.weight': (50, 8), 'col_embed.weight': (50, 8)}
    w_row, w_col = embed.row_embed.weight, embed.col_embed.weight
    assert 0 <= w_row.min() and w_row.max() <= 1  # uniform init on [0, 1)

    pos = embed(torch.randn(3, 5, 4, 6), torch.zeros(3, 4, 6, dtype=torch.bool))
    assert pos.shape == (3, 16, 4, 6)
    for i in range(4):
        for j in range(6):
            expected = torch.cat([w_col[j], w_row[i]])
            for b in range(3):
                torch.testing.assert_close(pos[b, :, i, j], expected)


def test_none_gives_no_embedding():
    assert build_position_encoding(args('none')) is None


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="position_embedding"):
        build_position_encoding(args('rotary'))
