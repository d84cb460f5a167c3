"""The hf methods' cards (``kind="hf"``, family ``"hf"``): one per policy, listed explicitly here.

``layer`` is the policy class, not an ``nn.Module``: ``card.layer(**card.defaults)`` builds
``full`` and ``streaming``; ``headwise`` also needs its ``full_heads`` table. As docs/architecture.md says, each kind keeps its own list: the registry
(level 3) may not import ``attnkit.hf`` (level 5), so these cards live in :data:`CARDS` and the
``attnkit`` command, which imports everything, lists them. The FLOP model counts the attention
core of a model layer of width ``dim`` with ``num_heads`` heads under the policy's pattern (the
model's projections are not attnkit's).
"""

from __future__ import annotations

from .. import patterns as _patterns
from ..cards import Capabilities, Card, FlopCount, dense_attention_flops
from .context import ContextSteer
from .duo import Duo
from .imbalance import PAINT
from .h2o import H2O, SFAttn, SinkLoRA, h2o_flops, sf_attn_flops
from .longheads import LongHeads
from .proxyattn import ProxyAttn
from .policies import Full, Headwise, Streaming
from .taskkv import TaskKV
from .var import VAR
from .vhr import VHR

__all__ = ["CARDS", "TOOL_CARDS"]

_CAPS = Capabilities(causal=True, bidirectional=False, decode=True, varlen=True, backends=("reference", "sdpa"))


def _flops(pattern_of):
    def flops(batch: int, seq: int, config: dict) -> FlopCount:
        dim, heads = config["dim"], config["num_heads"]
        attention = dense_attention_flops(batch, seq, num_heads=heads, head_dim=dim // heads,
                                          pattern=pattern_of(config))
        return FlopCount(attention_fwd=attention, projection_fwd=0.0)

    return flops


def _streaming_pattern(config):
    return _patterns.sink_window(config["sink"], config["window"])


def _headwise_pattern(config):
    # the card's FLOP model: half of the heads full, half sink + window (DuoAttention's typical split)
    half = [_patterns.causal(), _streaming_pattern(config)]
    return _patterns.per_head(half * max(1, config["num_heads"] // 2) + half[: config["num_heads"] % 2])


def _taskkv_pattern(config):
    # the card's FLOP model: full_fraction of the heads causal, the others about budget keys (sink + window)
    heads = config["num_heads"]
    full = min(heads, int(heads * config["full_fraction"] + 0.5))
    budget = _patterns.sink_window(config["sink"], config["budget"] - config["sink"])
    return _patterns.per_head([_patterns.causal()] * full + [budget] * (heads - full))
def _longheads_pattern(config):
    # each query attends to at most chunks * chunk_size keys: a sliding window of that size counts the same
    # pairs (chunks None: window // chunk_size, window None: a 4k-trained model, the shipped subject's)
    chunks = config.get("chunks") or (config.get("window") or 4096) // config["chunk_size"]
    return _patterns.sliding_window(chunks * config["chunk_size"])


def _proxyattn_pattern(config):
    # the budget is data-dependent: the card counts a fixed fraction of the causal pairs
    # (budget, or 1 - gamma's complement as a stand-in when the budget is dynamic)
    fraction = config.get("budget") or 1.0 - 0.5 * (1.0 - config.get("gamma", 0.95))
    return _patterns.causal() if fraction >= 1 else _FractionOfCausal(fraction)


class _FractionOfCausal(_patterns.Pattern):
    """A FLOP-model stand-in: ``fraction`` of the causal pairs (never used to attend)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def _row_counts(self, q_pos, kv_len):
        return (q_pos + 1).clamp(max=kv_len) * self.fraction


CARDS: tuple[Card, ...] = (
    Card(name="hf-full", title="The model's own attention through attnkit.attend", arxiv=None, family="hf", kind="hf",
         layer=Full, flops=_flops(lambda c: _patterns.causal()), capabilities=_CAPS,
         summary="every head attends to every cached key (exactly the model's sdpa attention)"),
    Card(name="hf-streaming", title="Efficient Streaming Language Models with Attention Sinks", arxiv="2309.17453",
         family="hf", kind="hf", layer=Streaming, flops=_flops(_streaming_pattern), defaults={"sink": 4, "window": 1024},
         capabilities=_CAPS, summary="StreamingLLM: every head keeps sink + window tokens; the cache frees the rest"),
    Card(name="hf-headwise",
         title="DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
         arxiv="2410.10819", family="hf", kind="hf", layer=Headwise, flops=_flops(_headwise_pattern),
         defaults={"sink": 4, "window": 1024}, capabilities=_CAPS,
         summary="per (layer, KV head): full (retrieval head) or sink + window (streaming head); memory really freed"),
    Card(name="hf-duo",
         title="DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
         arxiv="2410.10819", family="hf", kind="hf", layer=Duo, flops=_flops(_headwise_pattern),
         defaults={"sparsity": 0.5, "sink": 64, "window": 256}, capabilities=_CAPS,
         summary="DuoAttention: gates per KV head identified by distillation (attnkit identify-duo), the "
                 "sparsity fraction of lowest gates streams (sink + window), the rest keep every token"),
    Card(name="hf-taskkv",
         title="Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads",
         arxiv="2501.15113", family="hf", kind="hf", layer=TaskKV, flops=_flops(_taskkv_pattern),
         defaults={"budget": 512, "sink": 16, "recent": 256, "full_fraction": 0.25}, capabilities=_CAPS,
         summary="heads far from the semantic centre keep the full cache, the others sink + middle activations + "
                 "recent tokens within a budget"),
    Card(name="hf-h2o", title="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
         arxiv="2306.14048", family="hf", kind="hf", layer=H2O, flops=h2o_flops, capabilities=_CAPS,
         defaults={"budget": 256, "recent": 0.5, "sink": 0},
         summary="every KV head keeps budget tokens: recent ones + heavy hitters (accumulated attention), "
                 "evicting at prefill and at every decode step; memory really freed"),
    Card(name="hf-sinklora", title="SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large "
         "Language Models", arxiv="2406.05678", family="hf", kind="hf", layer=SinkLoRA, flops=h2o_flops,
         capabilities=_CAPS, defaults={"budget": 256, "recent": 0.5, "sink": 4},
         summary="SinkLoRA's inference: H2O with the first sink tokens always kept"),
    Card(name="hf-sf-attn", title="SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large "
         "Language Models", arxiv="2406.05678", family="hf", kind="hf", layer=SFAttn, flops=sf_attn_flops,
         capabilities=Capabilities(causal=True, bidirectional=False, decode=False, varlen=True,
                                   backends=("reference", "sdpa")),
         defaults={"group_size": None, "group_ratio": 0.25, "sink": 4},
         summary="SF-Attn for long-context fine-tuning: LongLoRA's shifted groups without wrap-around + global sink "
                 "tokens (training forwards; inference uses full attention)"),
    Card(name="hf-longheads", title="LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
         arxiv="2402.10685", family="hf", kind="hf", layer=LongHeads,
         flops=_flops(_longheads_pattern), defaults={"chunk_size": 256}, capabilities=_CAPS,
         summary="per KV head and query: the first, the local and the top-scoring chunks, positions remapped into "
                 "the trained window (full cache kept)"),
    Card(name="hf-proxyattn", title="ProxyAttn: Guided Sparse Attention via Representative Heads",
         arxiv="2509.24745", family="hf", kind="hf", layer=ProxyAttn, flops=_flops(_proxyattn_pattern),
         defaults={"block_size": 128, "gamma": 0.95, "query_stride": 16}, capabilities=_CAPS,
         summary="pooled proxy heads rank key blocks per query block; per-head dynamic budgets; block-sparse prefill "
                 "(FlexAttention on CUDA), decode full"),
    Card(name="hf-context", title="On the Loss of Context-awareness in General Instruction Fine-tuning",
         arxiv="2411.02688", family="hf", kind="hf", layer=ContextSteer, flops=_flops(lambda c: _patterns.causal()),
         defaults={"alpha": 0.9}, capabilities=_CAPS,
         summary="manual head steering toward the user's context (PASTA's reweighting: the prompt's other tokens "
                 "scaled by alpha, rows renormalised); needs the context mask (context=)"),
    Card(name="hf-var", title="See What You Are Told: Visual Attention Sink in Large Multimodal Models",
         arxiv="2503.03321", family="hf", kind="hf", layer=VAR, flops=_flops(lambda c: _patterns.causal()),
         defaults={"p": 0.6, "rho": 0.5, "summ": 0.2}, capabilities=_CAPS,
         summary="VAR on a span (image tokens, a document): sinks by massive hidden dimensions, span-centric rows "
                 "give (1-p) of the sinks' weight to the span's other tokens (full cache kept)"),
    Card(name="hf-vhr", title="Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
         arxiv="2412.13949", family="hf", kind="hf", layer=VHR, flops=_flops(lambda c: _patterns.causal()),
         defaults={"alpha": 2.0}, capabilities=_CAPS,
         summary="VHD: each head's output with vs without the span; VHR multiplies the outputs of the heads above "
                 "their layer's median VHD (surges excluded) by alpha"),
    Card(name="hf-paint", title="Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large "
         "Vision-Language Model", arxiv="2501.12206", family="hf", kind="hf", layer=PAINT,
         flops=_flops(lambda c: _patterns.causal()), defaults={"alpha": 0.7, "beta": 0.3}, capabilities=_CAPS,
         summary="PAINT: local and summary tokens of a span get logits raised by alpha|z| / beta|z|, per head "
                 "scaled by its measured span sensitivity"),
)

#: Methods on a model that are not attention policies (they change weights, not attention): listed
#: by ``attnkit list`` in a table of their own; ``layer`` is the method's main object.
def _no_flops(batch: int, seq: int, config: dict) -> FlopCount:
    return FlopCount(attention_fwd=0.0, projection_fwd=0.0)


def _tool_cards() -> tuple:
    from .mergelock import MergeLockKey

    return (
        Card(name="hf-mergelock", title="Model Unmerging: Making Your Models Unmergeable for Secure Model Sharing",
             arxiv="2509.01548", family="hf", kind="hf", layer=MergeLockKey, flops=_no_flops,
             summary="lock(model, seed) -> key: random invertible QK (RoPE-commuting) and VO transforms per KV head; "
                     "the same logits, weight-space merging breaks; unlock(model, key)"),
    )


TOOL_CARDS: tuple = _tool_cards()
# steering methods (issue 24): they change chosen heads' weights or outputs, not which keys are attended
from .act import ACT  # noqa: E402
from .taskinject import TaskInject  # noqa: E402
from .zerotuning import ZeroTuning  # noqa: E402

CARDS = CARDS + (
    Card(name="hf-zerotuning", title="ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language "
         "Models Without Training", arxiv="2505.11739", family="hf", kind="hf", layer=ZeroTuning,
         flops=_flops(lambda c: _patterns.causal()), defaults={"gamma": 1.0}, capabilities=_CAPS,
         summary="per-head scaling of the attention paid to the initial token (log gamma added to its logit); "
                 "heads and gamma chosen by a supervised sweep or by minimum output entropy (fit_zerotuning)"),
    Card(name="hf-act", title="Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models "
         "without Training through Attention Calibration", arxiv="2406.15765", family="hf", kind="hf", layer=ACT,
         flops=_flops(lambda c: _patterns.causal()), defaults={"beta": 0.4, "threshold": 0.1}, capabilities=_CAPS,
         summary="ACT: sinks inside the input (mean received attention > threshold) keep beta of their weight in "
                 "calibrated heads, the rest goes to the other tokens; heads chosen per head on calibration prompts"),
    Card(name="hf-taskinject", title="Soft Injection of Task Embeddings Outperforms Prompt-Based In-Context "
         "Learning", arxiv="2507.20906", family="hf", kind="hf", layer=TaskInject,
         flops=_flops(lambda c: _patterns.causal()), defaults={}, capabilities=_CAPS,
         summary="task embeddings (mean head outputs at the last token of few-shot prompts) mixed into the heads' "
                 "outputs zero-shot with learnt soft head-selection weights sigmoid(theta)"),
)
