"""Tiny random transformers models, built offline from their configs (no download)."""

import pytest
import torch

VOCAB = 128


def tiny(arch: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A tiny random causal LM of ``arch`` (llama, qwen2, mistral, gemma3, phi3) in eval mode."""
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
    if arch == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "mistral":
        # a window that bites at these lengths: the model's own sliding window must be honoured
        config, cls = tf.MistralConfig(**common, sliding_window=6), tf.MistralForCausalLM
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=6,
                                     layer_types=["sliding_attention", "full_attention"])
        cls = tf.Gemma3ForCausalLM
    elif arch == "phi3":
        config, cls = tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    return model


ARCHS = ("llama", "qwen2", "mistral", "gemma3", "phi3")


@pytest.fixture
def llama():
    """A tiny random Llama (2 layers, 4 query heads, 2 KV heads, head dim 16), fp32, eval mode."""
    return tiny("llama")


def padded_inputs(B=2, T=14, pads=(0, 5), seed=0):
    """Random ids [B, T] and an attention mask with ``pads[b]`` left-padding tokens in row ``b``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 0, 0
    return ids, mask


def greedy_decode(model, ids, mask, cache, steps, after_each=None):
    """Prefill, then feed the greedy token ``steps`` times; logits of every call [B, T_call, V].
    ``after_each()`` runs after every call (to inspect the cache)."""
    out = []
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        r = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        out.append(r.logits)
        if after_each:
            after_each()
        for _ in range(steps):
            nxt = r.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            r = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            out.append(r.logits)
            if after_each:
                after_each()
    return out
