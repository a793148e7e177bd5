"""DETR's encoder-decoder transformer, with iRPE attention in every encoder layer.

As in DETR: post-norm layers by default (--pre_norm for pre-norm); the absolute position encoding is
added to queries and keys of every attention; the decoder returns every layer's output for the
auxiliary losses.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.irpe import rpe_parameters


# How the iRPE lookup tables start: 'xavier' as every other transformer matrix (the published code),
# 'zero' (the paper's appendix).
RPE_INITS = ('xavier', 'zero')


def with_pos(x, pos):
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False, rpe_config=None,
                 attention_impl='auto'):
        super().__init__()
        self.self_attn = RPEMultiheadAttention(d_model, nhead, dropout=dropout, rpe_config=rpe_config,
                                               attention_impl=attention_impl)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, src, mask, pos, height, width):
        """src: (L, B, E); mask: (B, L) True on padding; pos: (L, B, E) or None."""
        x = self.norm1(src) if self.normalize_before else src
        q = k = with_pos(x, pos)
        src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=mask, height=height, width=width)[0])
        if not self.normalize_before:
            src = self.norm1(src)
        x = self.norm2(src) if self.normalize_before else src
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        """tgt: (Q, B, E); memory: (L, B, E); memory_mask: (B, L) True on padding."""
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
        if not pre:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(with_pos(x, query_pos), with_pos(memory, pos), memory,
                                                      key_padding_mask=memory_mask, need_weights=False)[0])
        if not pre:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        if not pre:
            tgt = self.norm3(tgt)
        return tgt


class Encoder(nn.Module):
    def __init__(self, layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src, mask, pos, height, width):
        for layer in self.layers:
            src = layer(src, mask, pos, height, width)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, layer, num_layers, norm):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        """Returns (num_layers, Q, B, E): every layer's output, normalised, for the auxiliary losses."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, normalize_before=False, rpe_config=None, rpe_init='xavier', attention_impl='auto'):
        super().__init__()
        if rpe_init not in RPE_INITS:
            raise ValueError(f'rpe_init {rpe_init!r} is not one of {list(RPE_INITS)}: --rpe_init xavier (the '
                             "published code's recipe) or zero (the paper's appendix).")
        enc = EncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before, rpe_config, attention_impl)
        self.encoder = Encoder(enc, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None)
        dec = DecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = Decoder(dec, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model, self.nhead = d_model, nhead
        # DETR's init: xavier_uniform_ on every parameter of more than one dimension, in registration order.
        # The published iRPE code's tables live inside each encoder layer's self_attn (after in_proj_weight
        # and out_proj), so they are among them, and the random stream of every later parameter depends on
        # it. rpe_init='zero' leaves them at zero (the paper's appendix: the model starts as plain DETR).
        kept_at_zero = {id(p) for p in rpe_parameters(self)} if rpe_init == 'zero' else set()
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in kept_at_zero:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos):
        """src: (B, E, h, w); mask: (B, h, w) True on padding; query_embed: (Q, E); pos: (B, E, h, w) or None.

        Returns (decoder outputs (num_decoder_layers, B, Q, E), memory (B, E, h, w)).
        """
        B, E, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos = None if pos is None else pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, B, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos, h, w)
        hs = self.decoder(torch.zeros_like(query_pos), memory, mask, pos, query_pos)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(B, E, h, w)


def build_transformer(args, rpe_config=None):
    return Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                       dropout=args.dropout, normalize_before=args.pre_norm, rpe_config=rpe_config,
                       rpe_init=getattr(args, 'rpe_init', 'xavier'),
                       attention_impl=getattr(args, 'attention_impl', 'auto'))
