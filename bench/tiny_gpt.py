"""A small GPT-2 style model for training runs on the CPU: bench/quality.py trains it, and
tests/e2e/test_accounting.py counts SlimAdam's state on it.

Token and position embeddings, pre-norm causal attention and MLP blocks, an lm_head; the parameter
names match SlimAdam's static rules (q/k/v/o projections, c_fc, c_proj, wte, wpe, ln_*).
"""

from __future__ import annotations

import math

import torch


class TinyGPT(torch.nn.Module):
    """`layers` blocks of width `d` with `heads` attention heads, over `vocab` tokens and up to `ctx`
    positions."""

    def __init__(self, vocab: int = 256, ctx: int = 64, d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.d, self.heads = d, heads
        self.wte = torch.nn.Embedding(vocab, d)
        self.wpe = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            b = torch.nn.Module()
            b.ln_1, b.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            b.q_proj, b.k_proj, b.v_proj, b.o_proj = (torch.nn.Linear(d, d) for _ in range(4))
            b.c_fc, b.c_proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.blocks.append(b)
        self.ln_f = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.register_buffer("mask", mask)

    def forward(self, idx):
        T, D, heads = idx.shape[1], self.d, self.heads
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.blocks:
            h = b.ln_1(x)
            q, k, v = (proj(h).view(h.shape[0], T, heads, D // heads).transpose(1, 2)
                       for proj in (b.q_proj, b.k_proj, b.v_proj))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads) + self.mask[:T, :T], -1)
            x = x + b.o_proj((att @ v).transpose(1, 2).reshape(h.shape[0], T, D))
            x = x + b.c_proj(torch.nn.functional.gelu(b.c_fc(b.ln_2(x))))
        return self.lm_head(self.ln_f(x))
