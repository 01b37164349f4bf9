"""Multi-head self-attention with a fused `qkv` projection, dispatched through transformers' attention interface."""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: softmax(q k^T * scale + mask) v. Shapes [B, heads, N, head_dim]."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def padding_attention_mask(padding_mask, dtype, num_prefix_tokens=0):
    """Additive key mask [B, 1, 1, N] from a bool padding mask [B, N - prefix] (True = padding), or None for None.
    Reads no tensor value (callers pass None where nothing is padded), so it compiles and exports."""
    if padding_mask is None:
        return None
    if num_prefix_tokens:
        prefix = padding_mask.new_zeros(padding_mask.shape[0], num_prefix_tokens)
        padding_mask = torch.cat([prefix, padding_mask], dim=1)
    additive = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    additive = additive.masked_fill(padding_mask, torch.finfo(dtype).min)
    return additive[:, None, None, :]


class CastSelfAttention(nn.Module):
    """timm-style attention: one `qkv` Linear, heads split as (3, heads, head_dim), output `proj`."""

    def __init__(self, config, num_heads):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = config.hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.qkv.is_fused_qkv = True  # initialised with Q, K and V treated as separate matrices
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        """hidden_states [B, N, C]; attention_mask additive [B, 1, 1, N] or None. Returns the output [B, N, C] and the
        attention weights [B, heads, N, N] (None unless computed eagerly). `output_attentions=True` among `kwargs`
        selects the eager implementation, so the weights exist to be recorded (transformers' sdpa function would
        return None and only warn)."""
        batch, length, channels = hidden_states.shape
        # [3, B, heads, N, head_dim]
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)

        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = self.proj_dropout(self.proj(attn_output.reshape(batch, length, channels)))
        return attn_output, attn_weights


__all__ = ["CastSelfAttention", "eager_attention_forward", "padding_attention_mask"]
