"""GPT-2, exactly as OpenAI's: pre-LayerNorm blocks, learned positions, tanh GELU, tied head.

Parameter names are GPT-2's own (as in Hugging Face's `GPT2LMHeadModel`), so converting a
checkpoint is a list of transposes. `forward` returns logits of shape (B, T, vocab_size), or, given
targets, the mean next-token loss, computed through the head without those logits (loss.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig
from .loss import full_logits, head_loss, reference_loss


class KVCache(nn.Module):
    """Keys and values of past positions, allocated once for a batch and a maximum length."""

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions start..start+T; return all keys and values so far."""
        B, end = k.size(0), start + k.size(2)
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, start: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, nh, start + T, hs)
        # With no explicit mask the attention is plainly causal, which lets GPUs use flash kernels.
        is_causal = mask is None and T > 1 and T == k.size(2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, start)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_ctx, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory
        self.apply(self._init_weights)
        # GPT-2 scales the init of each residual branch's output projection by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def tie_weights(self) -> None:
        """Share the output head with the token embedding (needed again after assign-loading)."""
        self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    # -- incremental decoding -------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int | None = None, *,
                    dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache in every block, once, for up to `max_len` slots (default n_ctx).

        A left-padded batch also caches its padding, so its rows may need more slots than n_ctx;
        positions (position_ids) still stay below n_ctx.
        """
        max_len = self.config.n_ctx if max_len is None else max_len
        if max_len <= 0:
            raise ValueError(f"cache length must be positive, got {max_len}")
        ref = self.transformer.ln_f.weight  # the activations' dtype (weights may be quantized)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_head, self.config.head_dim,
                                          dtype=dtype or ref.dtype, device=ref.device)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def cache_len(self) -> int:
        """Positions the KV cache can hold (0 when there is none)."""
        cache = self.transformer.h[0].attn.kv_cache
        return 0 if cache is None else cache.k.size(2)

    # -- forward --------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, *, start: int = 0, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); or, given targets, the mean loss.

        start:        with a KV cache, the cache slot of idx[:, 0]; the tokens before it are cached.
        position_ids: (B, T) learned-position index of each token; defaults to start..start+T-1.
                      Left-padded batches pass their own so that every row starts at position 0.
        key_mask:     (B, start+T) bool, False for slots no token may attend to (padding).
        targets:      (B, T) the next token of each position: the result is then the mean
                      cross-entropy in nats, computed a chunk of tokens at a time so that the
                      (B, T, vocab_size) logits never exist (training's largest tensor otherwise);
                      compiled on a GPU, through the full logits, which Inductor fuses (loss.py).
        loss_mask:    (B, T), nonzero for the targets that count (fine-tuning masks the prompt).
        """
        x = self.hidden(idx, start=start, position_ids=position_ids, key_mask=key_mask)
        if targets is None:
            return self.lm_head(x)
        if type(self.lm_head) is nn.Linear and not full_logits(x):
            return head_loss(x, self.lm_head.weight, targets, loss_mask)
        return reference_loss(self.lm_head(x), targets, loss_mask)  # compiled on a GPU; a quantized or adapted head

    def hidden(self, idx: torch.Tensor, *, start: int = 0, position_ids: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ln_f: `forward` without the output head.

        Generation applies the head to the last position only, which spares a (B, T, vocab) prefill.
        """
        B, T = idx.shape
        end = start + T
        if self.cache_len:
            if end > self.cache_len:
                raise ValueError(f"positions {start}..{end - 1} do not fit the KV cache of {self.cache_len}")
        elif start:
            raise ValueError("start > 0 needs a KV cache: call setup_cache() first")
        if position_ids is None:
            if end > self.config.n_ctx:
                raise ValueError(f"sequence of {end} tokens exceeds the model's context of {self.config.n_ctx}")
            position_ids = torch.arange(start, end, device=idx.device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(T, start, key_mask, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))  # (B, T, C)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, start, use_reentrant=False)
            else:
                x = block(x, mask, start)
        return self.transformer.ln_f(x)  # (B, T, C)

    @staticmethod
    def _attention_mask(T: int, start: int, key_mask: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
        """A bool mask (B|1, 1, T, start+T), or None where plain causal attention is exact."""
        if key_mask is None and (start == 0 or T == 1):
            return None
        S = start + T
        q_pos = torch.arange(start, S, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            if key_mask.shape[-1] != S:
                raise ValueError(f"key_mask covers {key_mask.shape[-1]} positions, expected {S}")
            # A padding query attends to itself, so no row is fully masked (that would give NaNs).
            mask = (mask & key_mask[:, None, None, :].bool()) | (k_pos == q_pos)[None, None]
        return mask
