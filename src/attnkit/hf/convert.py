"""Converters between attnkit's :class:`~attnkit.models.DecoderLM` and transformers' ``LlamaForCausalLM``.

The two architectures agree exactly when the DecoderLM's attention is dense softmax attention
(the ``mha``, ``gqa`` and ``mqa`` cards: ``MultiHeadAttention``):

- embedding / output: ``embed`` (tied output) -> ``embed_tokens`` with ``tie_word_embeddings``;
- norms: ``nn.RMSNorm(eps=norm_eps)`` -> ``LlamaRMSNorm(rms_norm_eps)``;
- attention: ``qkv_proj`` ``[(H + 2 Hkv) D, C]`` and ``o_proj`` (``bias`` on all four) ->
  ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``attention_bias``);
- RoPE: rotate-half with base ``rope_base`` -> rotate-half with ``rope_theta`` (default type);
- MLP: SwiGLU ``gate_up`` = [gate; up] -> ``gate_proj``, ``up_proj``, ``down_proj``.

What has no Llama counterpart raises ``ValueError``: another mechanism, a pattern other than
causal, ``qk_norm``, ``rope=False``, layers with different KV-head counts or head dims; and
from the Llama side an untied output layer, ``mlp_bias``, an activation other than SiLU, RoPE
scaling. Logits agree to float rounding (RoPE angles: attnkit computes the frequencies in float64,
Llama in float32).
"""

from __future__ import annotations

import torch

__all__ = ["to_hf", "from_hf"]

_DENSE = ("mha", "gqa", "mqa")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params and params["rope_type"] != "default":
        raise ValueError(f"from_hf: RoPE scaling {params['rope_type']!r} has no DecoderLM counterpart; accepted: default")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("from_hf: the config names no rope_theta")
    return float(theta)


def to_hf(model):
    """A ``LlamaForCausalLM`` computing the same logits as ``model`` (a :class:`DecoderLM`
    whose layers are ``mha`` / ``gqa`` / ``mqa``), on the same device and dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..layers.multi_head import MultiHeadAttention
    from ..models import DecoderLM

    if not isinstance(model, DecoderLM):
        raise ValueError(f"to_hf takes an attnkit DecoderLM, got {type(model).__name__}")
    cfg = model.config
    names = cfg["attention"]
    other = sorted({n for n in names if n not in _DENSE})
    if other:
        raise ValueError(f"to_hf: mechanism(s) {other} have no LlamaForCausalLM counterpart; accepted: "
                         f"{', '.join(_DENSE)} (dense softmax attention)")
    attns = [block.attn for block in model.layers]
    for i, a in enumerate(attns):
        if type(a) is not MultiHeadAttention:
            raise ValueError(f"to_hf: layer {i} is {type(a).__name__}; accepted: MultiHeadAttention (mha, gqa, mqa)")
        if a.pattern.kind != "causal":
            raise ValueError(f"to_hf: layer {i} has pattern {a.pattern!r}; LlamaForCausalLM is causal: accepted: causal")
        if a.q_norm is not None:
            raise ValueError(f"to_hf: layer {i} uses qk_norm=True, which Llama has not; accepted: qk_norm=False")
        if a.rope is None:
            raise ValueError(f"to_hf: layer {i} has rope=False; Llama always rotates q and k: accepted: rope=True")
    shapes = {(a.num_kv_heads, a.head_dim, a.rope.base, a.qkv_proj.bias is not None) for a in attns}
    if len(shapes) != 1:
        raise ValueError(f"to_hf: layers differ in (num_kv_heads, head_dim, rope_base, bias) {sorted(shapes)}; "
                         "a LlamaConfig has one of each")
    num_kv_heads, head_dim, base, bias = shapes.pop()
    param = model.embed.weight
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"], intermediate_size=cfg["mlp_hidden"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"], num_key_value_heads=num_kv_heads,
        head_dim=head_dim, hidden_act="silu", rms_norm_eps=cfg["norm_eps"], tie_word_embeddings=True,
        attention_bias=bias, mlp_bias=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": base},
        max_position_embeddings=max(4096, 2 * cfg["dim"]),
    )
    hf = LlamaForCausalLM(config).to(device=param.device, dtype=param.dtype).eval()
    H, D = cfg["num_heads"], head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embed.weight)
        hf.model.norm.weight.copy_(model.norm.weight)
        for block, layer in zip(model.layers, hf.model.layers):
            a = block.attn
            q, k, v = a.qkv_proj.weight.split((H * D, num_kv_heads * D, num_kv_heads * D), dim=0)
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
            layer.self_attn.o_proj.weight.copy_(a.o_proj.weight)
            if bias:
                qb, kb, vb = a.qkv_proj.bias.split((H * D, num_kv_heads * D, num_kv_heads * D))
                layer.self_attn.q_proj.bias.copy_(qb)
                layer.self_attn.k_proj.bias.copy_(kb)
                layer.self_attn.v_proj.bias.copy_(vb)
                layer.self_attn.o_proj.bias.copy_(a.o_proj.bias)
            gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(block.mlp.down.weight)
            layer.input_layernorm.weight.copy_(block.attn_norm.weight)
            layer.post_attention_layernorm.weight.copy_(block.mlp_norm.weight)
    hf.tie_weights()
    return hf


def from_hf(model):
    """A :class:`DecoderLM` computing the same logits as ``model`` (a ``LlamaForCausalLM``)."""
    from transformers import LlamaForCausalLM

    from ..models import DecoderLM

    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"from_hf takes a transformers LlamaForCausalLM, got {type(model).__name__}")
    c = model.config
    if not getattr(c, "tie_word_embeddings", False):
        raise ValueError("from_hf: the model's output layer is not tied to its embedding (tie_word_embeddings=False); "
                         "DecoderLM ties them: accepted: tie_word_embeddings=True")
    if getattr(c, "mlp_bias", False):
        raise ValueError("from_hf: mlp_bias=True has no DecoderLM counterpart (SwiGLU without bias); accepted: False")
    if c.hidden_act != "silu":
        raise ValueError(f"from_hf: hidden_act={c.hidden_act!r}; DecoderLM's SwiGLU uses silu: accepted: silu")
    H, Hkv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    bias = bool(getattr(c, "attention_bias", False))
    name = "mha" if Hkv == H else ("mqa" if Hkv == 1 else "gqa")
    options = {"num_kv_heads": Hkv, "rope_base": _rope_theta(c), "bias": bias, "pattern": "causal"}
    if D * H != c.hidden_size:
        options["head_dim"] = D
    param = model.model.embed_tokens.weight
    out = DecoderLM(vocab_size=c.vocab_size, dim=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=H,
                    attention=name, attention_options=options, mlp_hidden=c.intermediate_size,
                    norm_eps=c.rms_norm_eps).to(device=param.device, dtype=param.dtype).eval()
    with torch.no_grad():
        out.embed.weight.copy_(model.model.embed_tokens.weight)
        out.norm.weight.copy_(model.model.norm.weight)
        for block, layer in zip(out.layers, model.model.layers):
            a, s = block.attn, layer.self_attn
            a.qkv_proj.weight.copy_(torch.cat([s.q_proj.weight, s.k_proj.weight, s.v_proj.weight], dim=0))
            a.o_proj.weight.copy_(s.o_proj.weight)
            if bias:
                a.qkv_proj.bias.copy_(torch.cat([s.q_proj.bias, s.k_proj.bias, s.v_proj.bias]))
                a.o_proj.bias.copy_(s.o_proj.bias)
            block.mlp.gate_up.weight.copy_(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], dim=0))
            block.mlp.down.weight.copy_(layer.mlp.down_proj.weight)
            block.attn_norm.weight.copy_(layer.input_layernorm.weight)
            block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)
    return out

