"""The scheduler side of compaction: an AnLLM request holds blocks for its kept slots only.

:class:`AnchorScheduler` (vLLM's ``scheduler_cls`` for AnLLMs, set by :mod:`anllm_ext.vllm.plugin`) is
vLLM's scheduler plus two things:

- after every step, each request that ran gives the blocks past its kept slots
  (:func:`anllm_ext.vllm.compaction.num_kept` of its computed tokens) back to vLLM's block pool: the workers
  moved the kept slots to the front of its blocks in that step;
- its KV-cache manager counts slots, not tokens: a request needs ``kept + new tokens`` slots (the tokens
  computed minus those dropped), and a waiting prompt is admitted when its peak of kept slots plus one chunk
  fits, not its whole length.

Prefix caching is switched off for AnLLMs: vLLM's block hashes say block *i* holds tokens
``[i * B, (i + 1) * B)``, which compaction breaks, so a hit could attend the wrong keys.
"""
from __future__ import annotations

import numpy as np

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from ..errors import UnsupportedError
from .compaction import num_kept, peak_kept
from .detect import anchor_config_of

logger = init_logger("vllm.plugins.anllm_ext")


class AnchorScheduler(Scheduler):
    """vLLM's scheduler with compaction of AnLLM requests' blocks (see the module docstring)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        config = anchor_config_of(vllm_config.model_config)
        if config is None:
            raise UnsupportedError("AnchorScheduler serves AnLLMs only (the model has no anchor configuration)")
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("anllm_ext: prefix caching off for the AnLLM (compacted blocks do not hold the tokens "
                        "their hashes name)")
            vllm_config.cache_config.enable_prefix_caching = False
        super().__init__(vllm_config, *args, **kwargs)
        self.anchor_ids = np.asarray(config.anchor_ids, dtype=np.int64)
        self._managers = self.kv_cache_manager.coordinator.single_type_managers
        for manager in self._managers:
            if type(manager) is not FullAttentionManager:
                raise UnsupportedError(f"anllm_ext compacts full-attention KV caches only, not {type(manager).__name__}")
            manager.__class__ = CompactingAttentionManager  # same state, two methods count slots instead of tokens
            manager.dropped = {}
            manager.admission_slots = self._admission_slots

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished():
                n = request.num_computed_tokens
                kept = num_kept(request.all_token_ids[:n], self.anchor_ids)
                for manager in self._managers:
                    manager.compact(req_id, kept, n - kept)
        return outputs

    def _admission_slots(self, request_id: str) -> int:
        """Slots a waiting request can need at once while its tokens are (re)computed: its peak of kept slots
        plus one step's budget of new tokens (a preempted request recomputes its outputs too)."""
        request = self.requests[request_id]
        return peak_kept(request.all_token_ids[:], self.anchor_ids) + self.scheduler_config.max_num_batched_tokens

    def blocks_in_use(self) -> int:
        """KV blocks held by requests now (for tests and benchmarks)."""
        pool = self.kv_cache_manager.block_pool
        return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # block 0 is vLLM's null block


class CompactingAttentionManager(FullAttentionManager):
    """vLLM's full-attention manager counting a request's slots (tokens minus those dropped by compaction)."""

    dropped: dict  # request id -> tokens computed but no longer in the cache
    admission_slots = None  # request id -> slots a waiting prompt can need at once

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, apply_admission_cap=False, **kwargs):
        num_tokens -= self.dropped.get(request_id, 0)
        if apply_admission_cap:  # admission of a waiting prompt: what compaction lets it peak at
            num_tokens = min(num_tokens, self.admission_slots(request_id))
        return super().get_num_blocks_to_allocate(request_id, num_tokens, *args,
                                                  apply_admission_cap=apply_admission_cap, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, *args, **kwargs):
        return super().allocate_new_blocks(request_id, num_tokens - self.dropped.get(request_id, 0), *args, **kwargs)

    def compact(self, request_id: str, kept: int, dropped: int) -> None:
        """The request keeps ``kept`` slots: free its blocks past them (the workers did the same)."""
        blocks = self.req_to_blocks[request_id]
        keep = cdiv(kept, self.block_size)
        if len(blocks) > keep:
            self.block_pool.free_blocks(reversed(blocks[keep:]))
            del blocks[keep:]
        self.dropped[request_id] = dropped

    def pop_blocks_for_free(self, request_id: str):
        self.dropped.pop(request_id, None)  # freed or preempted: a recomputation starts from nothing
        return super().pop_blocks_for_free(request_id)
