"""The CLIP text encoder of Stable Diffusion (transformers' CLIPTextModel, no pooling).

SD 1.x uses OpenAI CLIP ViT-L/14 (quick_gelu, 12 layers); SD 2.x uses OpenCLIP ViT-H/14's text
tower, which diffusers folders store as a CLIPTextModel with hidden_act "gelu" and 23 of its 24
layers (the penultimate layer's output is what SD 2.x was trained on), final LayerNorm applied.

Parameter names are the checkpoint keys (``text_model.embeddings.token_embedding.weight``, ...).
transformers 5 drops the ``text_model.`` prefix from CLIPTextModel.state_dict(); load_state_dict
here accepts either spelling.

``forward(input_ids=None, inputs_embeds=None, clip_skip=1) -> [B, L, dim]``: clip_skip=1 is the
last layer's output, clip_skip=n the hidden state n-1 layers before the end; both then go
through the final LayerNorm (A1111 semantics). The layers after the one asked for are not run.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import ops


@dataclass
class CLIPTextConfig:
    """transformers CLIPTextConfig keys with transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        cfg = cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})
        if cfg.hidden_act not in _ACTS:
            raise NotImplementedError(
                f"CLIPTextEncoder: hidden_act {cfg.hidden_act!r} is not one of {list(_ACTS)}")
        return cfg


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class LayerNorm(nn.LayerNorm):
    def forward(self, x):  # [..., C]
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, L, C]
        B, L, C = x.shape
        H, D = self.heads, self.dim_head
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(x).view(B, L, H, D).transpose(1, 2)
        v = self.v_proj(x).view(B, L, H, D).transpose(1, 2)
        # ops.attention has no causal mask; the text encoder runs once per prompt, so torch's SDPA
        # is fine here.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5)  # [B, H, L, D]
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = _ACTS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):  # [B, L, C]
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):  # [B, L, C]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = CLIPTextConfig.from_dict(config)
        self.text_model = CLIPTextTransformer(self.config)

    def token_embedding(self, input_ids):
        """input_ids [B, L] -> token vectors [B, L, dim], without positions: what forward's
        ``inputs_embeds`` takes, so textual-inversion vectors can be spliced in between."""
        return self.text_model.embeddings.token_embedding(input_ids)

    def forward(self, input_ids=None, inputs_embeds=None, clip_skip: int = 1):
        # input_ids [B, L] or inputs_embeds [B, L, C] -> [B, L, C]
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("CLIPTextEncoder: pass exactly one of input_ids and inputs_embeds")
        layers = self.text_model.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"CLIPTextEncoder: clip_skip={clip_skip} is not in 1..{len(layers)}")
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        L = inputs_embeds.shape[1]
        pos = self.text_model.embeddings.position_embedding.weight[:L]  # [L, C]
        x = inputs_embeds + pos
        for layer in layers[: len(layers) - (clip_skip - 1)]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes transformers 5's un-prefixed keys, and drops the position_ids buffer that
        older checkpoints saved."""
        if not any(k.startswith("text_model.") for k in state_dict):
            state_dict = {"text_model." + k: v for k, v in state_dict.items()}
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
