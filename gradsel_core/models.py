"""TinyGPT: a small, readable, plain-torch causal GPT used by tests, demos and benchmarks.

Learned token and position embeddings, pre-LayerNorm blocks with causal self-attention written out
(no SDPA, so torch.func.vmap batches it), a GELU MLP, and an LM head (optionally tied to the
token embedding). ``forward`` returns the logits tensor (B, T, V).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyGPTConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    max_seq_len: int = 128
    d_ff: Optional[int] = None  # default 4 * d_model
    bias: bool = True
    tie_weights: bool = False
    dropout: float = 0.0
    pad_token_id: Optional[int] = None  # padding_idx of the token embedding

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, d = x.shape
        h = self.n_head
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, T, d)
        q = q.view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, dh)
        k = k.view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, dh)
        v = v.view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, dh)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)  # (B, h, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) causal
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T) keys
        # a finite fill keeps fully masked (padding) query rows free of NaN
        att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.fc_out = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attention_mask)  # (B, T, d)
        x = x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))  # (B, T, d)
        return x


class TinyGPT(nn.Module):
    def __init__(self, cfg: Optional[TinyGPTConfig] = None):
        super().__init__()
        self.config = cfg = cfg or TinyGPTConfig()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T), broadcast over B
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, d)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
