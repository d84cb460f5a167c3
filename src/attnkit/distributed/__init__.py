"""attnkit.distributed: attention across the ranks of a ``torch.distributed`` process group.

Sequence parallelism for softmax attention (:func:`ring_attend`, :func:`ulysses_attend`), the
sequence shards (:func:`shard`, :func:`unshard`, zigzag for causal balance) and :func:`spawn`
(W local processes on gloo, for tests and trying it without torchrun). See docs/distributed.md."""

from __future__ import annotations

from .lasp2 import lasp2_bytes, lasp2_lightning
from .launch import check_ring, spawn
from .parallel import MODES, Parallel, parallelize, sequence_loss, sum_gradients
from .ring import LAYOUTS, ring_attend, ring_bytes, sent_bytes, shard, shard_positions, ulysses_attend, unshard

__all__ = ["MODES", "Parallel", "parallelize", "sequence_loss", "sum_gradients", "lasp2_bytes", "lasp2_lightning", "LAYOUTS", "ring_attend", "ring_bytes", "sent_bytes", "check_ring", "shard", "shard_positions", "spawn", "ulysses_attend", "unshard"]

from .disagg import Plan as DisaggPlan, disaggregated_attend, plan as disagg_plan, step_time as disagg_step_time  # core attention disaggregation (issue 27)
__all__ += ["DisaggPlan", "disaggregated_attend", "disagg_plan", "disagg_step_time"]
from .offload import OffloadedAttention, offload, offload_plan, pingpong_step, serve  # noqa: E402

__all__ += ["OffloadedAttention", "offload", "offload_plan", "pingpong_step", "serve"]
