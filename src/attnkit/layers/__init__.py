"""One file per mechanism: the layer classes, and each module's cards as plain data
(``CARDS``), which :data:`attnkit.registry.LAYER_CARDS` lists explicitly. Importing this
package registers nothing."""

from .agent import AgentAttention, CausalAgentAttention
from .attention_experts import AttentionExperts, upcycle_attention, upcycle_models
from .base import AttentionLayer, check_input
from .compressed_conv import CompressedConvAttention
from .deconstructed import DistanceAttention, SequenceIndependentAttention, StaticEmbeddingAttention
from .dynamic_mask import DynamicMaskAttention
from .echo import EchoAttention
from .flow import FlowAttention
from .group import Chronos2Attention, GroupAttention
from .lightning import LightningAttention
from .matrix_atoms import MatrixAtomAttention
from .mixture_of_heads import MixtureOfHeadsAttention
from .multi_head import MultiHeadAttention
from .no_mixing import NoMixing
from .rcmha import RelativeConvAttention
from .s2 import S2Attention
from .selective import SelectiveAttention
from .sigmoid import SigmoidAttention
from .sparse_query import SparseQueryAttention
from .streaming import SlidingWindowAttention, StreamingAttention
from .titans import NeuralMemory, TitansMAC, TitansMAG, TitansMAL  # memory family (issue 28)
from .hcam import HCAMAttention

__all__ = [
    "AgentAttention",
    "AttentionExperts",
    "CausalAgentAttention",
    "AttentionLayer",
    "Chronos2Attention",
    "CompressedConvAttention",
    "DistanceAttention",
    "DynamicMaskAttention",
    "EchoAttention",
    "FlowAttention",
    "GroupAttention",
    "LightningAttention",
    "MatrixAtomAttention",
    "MixtureOfHeadsAttention",
    "MultiHeadAttention",
    "NoMixing",
    "RelativeConvAttention",
    "S2Attention",
    "SelectiveAttention",
    "SequenceIndependentAttention",
    "SigmoidAttention",
    "SlidingWindowAttention",
    "SparseQueryAttention",
    "StaticEmbeddingAttention",
    "StreamingAttention",
    "check_input",
    "upcycle_attention",
    "upcycle_models",
    # memory family (issue 28)
    "HCAMAttention",
    "NeuralMemory",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
]
