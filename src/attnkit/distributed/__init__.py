"""attnkit.distributed: attention across the ranks of a ``torch.distributed`` process group.

Sequence parallelism for softmax attention (:func:`ring_attend`, with a sliding window;
:func:`ulysses_attend`; :func:`s2_attend` for S2-Attention's strided pattern) and for Lightning
attention (:func:`lasp2_lightning`), a model made sequence parallel in one call (:func:`parallelize`:
LASP-2H for hybrid stacks) and decoding from a prompt split over the ranks (:func:`generate`), core
attention disaggregation (:func:`disaggregated_attend`), attention offloading for decoding
(:func:`offload`, :func:`serve`), the sequence shards (:func:`shard`, :func:`unshard`, zigzag for
causal balance) and :func:`spawn` (W local processes on gloo, for tests and trying it without
torchrun). See docs/distributed.md."""

from __future__ import annotations

from .disagg import Plan as DisaggPlan, disaggregated_attend  # core attention disaggregation
from .disagg import plan as disagg_plan, step_time as disagg_step_time
from .lasp2 import lasp2_bytes, lasp2_lightning
from .launch import check_ring, spawn
from .offload import OffloadedAttention, offload, offload_plan, pingpong_step, serve  # attention offloading
from .s2 import s2_attend, s2_bytes  # S2-Attention: only the blocks another rank can see travel
from .parallel import MODES, Parallel, generate, parallelize, sequence_loss, sum_gradients
from .ring import (LAYOUTS, ring_attend, ring_bytes, sent_bytes, shard, shard_positions, ulysses_attend, ulysses_bytes,
                   unshard)

__all__ = ["LAYOUTS", "MODES", "DisaggPlan", "OffloadedAttention", "Parallel", "check_ring", "disagg_plan",
           "disagg_step_time", "disaggregated_attend", "generate", "lasp2_bytes", "lasp2_lightning", "offload",
           "offload_plan", "parallelize", "pingpong_step", "ring_attend", "ring_bytes", "s2_attend", "s2_bytes",
           "sent_bytes", "sequence_loss", "serve", "shard", "shard_positions", "spawn", "sum_gradients",
           "ulysses_attend", "ulysses_bytes", "unshard"]
