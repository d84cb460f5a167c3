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
