"""The scheduler side of compaction: an AnLLM request holds blocks for its kept slots only.

:class:`AnchorScheduler` (vLLM's ``scheduler_cls`` for AnLLMs, set by :mod:`anllm_ext.vllm.plugin`) is
vLLM's scheduler plus two things:

- after every step, each request that ran gives the blocks past its kept slots
  (:meth:`anllm_ext.vllm.compaction.KeepRule.num_kept` of its computed tokens) back to vLLM's block pool: the
  workers moved the kept slots to the front of its blocks in that step;
- its KV-cache manager counts slots, not tokens: a request needs ``kept + new tokens`` slots (the tokens
  computed minus those dropped), and a waiting prompt is admitted when its peak of kept slots plus one chunk
  fits, not its whole length.

Prefix caching (when asked for, vLLM's default) reuses *anchor blocks* only. vLLM's own block hashes say
block *i* holds tokens ``[i * B, (i + 1) * B)``, which compaction breaks, so vLLM's caching of blocks is
switched off (:meth:`CompactingAttentionManager.cache_blocks`) and its lookup replaced
(:meth:`AnchorScheduler._get_local_prefix_cache_hit`). After compaction, block *i* of a request holds its
anchors ``[i * B, (i + 1) * B)`` once it has that many; they never move again, and their keys/values depend
only on the tokens up to the last of them (:meth:`anllm_ext.vllm.compaction.KeepRule.anchor_block_ends`; the
sink's first tokens are anchors of every request alike, so this holds with a sink too). After each
step such a block is cached under a hash chained over those tokens; a new request whose tokens start with
them takes the blocks and resumes right after that last anchor. Its kept slots are then exactly the reused
anchors (its open segment is empty), so the workers need nothing new. With recent sentences kept hot
(``anllm_recent`` > 0) the kept slots after any token also hold the sentences closed last, which no block of
anchors holds, so the plugin refuses prefix caching with that setting at engine start.
"""
from __future__ import annotations

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from ..errors import UnsupportedError
from .detect import keep_rule

logger = init_logger("vllm.plugins.anllm_ext")


class AnchorScheduler(Scheduler):
    """vLLM's scheduler with compaction of AnLLM requests' blocks (see the module docstring)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        rule = keep_rule(vllm_config)
        if rule is None:
            raise UnsupportedError("AnchorScheduler serves AnLLMs only (the model has no anchor configuration)")
        super().__init__(vllm_config, *args, **kwargs)
        self.rule = rule  # the workers build the same from the same engine config
        self._managers = self.kv_cache_manager.coordinator.single_type_managers
        for manager in self._managers:
            if type(manager) is not FullAttentionManager:
                raise UnsupportedError(f"anllm_ext compacts full-attention KV caches only, not {type(manager).__name__}")
            if manager.block_size != self.block_size:
                raise UnsupportedError(f"anllm_ext needs one block size, got {manager.block_size} and {self.block_size}")
            manager.__class__ = CompactingAttentionManager  # same state, methods count slots and cache anchor blocks
            manager.dropped = {}
            manager.admission_slots = self._admission_slots
        self._group_ids = [manager.kv_cache_group_id for manager in self._managers]
        self._hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        self._chains = {}  # request id -> hashes of its anchor blocks so far (computed once)
        if self.kv_cache_manager.enable_caching:
            logger.info("anllm_ext: prefix caching of the AnLLM reuses blocks of anchors (compacted prefixes)")

    def update_from_output(self, scheduler_output, model_runner_output):
        if self.kv_cache_manager.enable_caching:
            # before vLLM frees the finished requests' blocks: the step has run, every layer has moved its kept
            # slots to the front, so a block full of anchors is final (cached only now: a request scheduled
            # in the same step as the one computing it would read slots not yet moved)
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests.get(req_id)
                if request is not None and not request.is_finished():
                    self._cache_anchor_blocks(request)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in [r for r in self._chains if r not in self.requests]:
            del self._chains[req_id]
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished():
                n = request.num_computed_tokens
                kept = self.rule.num_kept(request.all_token_ids[:n])
                for manager in self._managers:
                    manager.compact(req_id, kept, n - kept)
        return outputs

    def _anchor_block_hashes(self, request, num_tokens: int) -> list:
        """(hash, tokens it summarises) of each anchor block of the request's first ``num_tokens`` tokens.
        Hash i is chained over the tokens of blocks ``0..i`` (vLLM's ``hash_block_tokens``, its extra keys:
        LoRA, cache salt), tagged so it never equals a hash of vLLM's token-aligned blocks."""
        if request.mm_features or request.prompt_embeds is not None:
            return []  # the anchors of embeddings or media are not token ids
        tokens = request.all_token_ids
        ends = self.rule.anchor_block_ends(tokens[:num_tokens], self.block_size)
        chain = self._chains.setdefault(request.request_id, [])
        for end in ends[len(chain):].tolist():
            start = chain[-1][1] if chain else 0
            extra, _ = kv_cache_utils.generate_block_hash_extra_keys(request, start, end, 0)
            parent = chain[-1][0] if chain else None
            chain.append((kv_cache_utils.hash_block_tokens(self._hash_fn, parent, tokens[start:end],
                                                           ("anllm_ext anchor block",) + (extra or ())), end))
        return chain[:len(ends)]

    def _get_local_prefix_cache_hit(self, request):
        """vLLM's lookup, over anchor blocks: the longest run of cached anchor blocks the request's tokens
        start with, and the tokens they stand for (up to the last reused anchor; the last token is always
        computed, for its logits). The request is then counted as having dropped those tokens minus the
        reused anchors, so it is given blocks for its kept slots only."""
        manager = self.kv_cache_manager
        for m in self._managers:
            m.dropped.pop(request.request_id, None)  # a waiting request holds nothing yet
        if not manager.prefix_cache_lookup_enabled(request):
            return manager.empty_kv_cache_blocks, 0, 0, False
        hits, num_tokens = [], 0
        for block_hash, end in self._anchor_block_hashes(request, request.num_tokens - 1):
            blocks = manager.block_pool.get_cached_block(block_hash, self._group_ids)
            if blocks is None:
                break
            hits.append(blocks)
            num_tokens = end
        if not hits:
            return manager.empty_kv_cache_blocks, 0, 0, False
        for m in self._managers:
            m.dropped[request.request_id] = num_tokens - len(hits) * self.block_size
        per_group = tuple(list(blocks) for blocks in zip(*hits))
        return manager.create_kv_cache_blocks(per_group), num_tokens, 0, False

    def _cache_anchor_blocks(self, request) -> None:
        """Cache the request's blocks that are full of anchors and not cached yet."""
        pool = self.kv_cache_manager.block_pool
        for i, (block_hash, end) in enumerate(self._anchor_block_hashes(request, request.num_computed_tokens)):
            for manager in self._managers:
                block = manager.req_to_blocks[request.request_id][i]
                key = kv_cache_utils.make_block_hash_with_group_id(block_hash, manager.kv_cache_group_id)
                pool._insert_block_hash(key, block, num_tokens=end)  # no-op when already cached under it

    def _admission_slots(self, request_id: str) -> int:
        """Slots a waiting request can need at once while its tokens are (re)computed: its peak of kept slots
        plus one step's budget of new tokens (a preempted request recomputes its outputs too)."""
        request = self.requests[request_id]
        return self.rule.peak_kept(request.all_token_ids[:]) + self.scheduler_config.max_num_batched_tokens

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

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        """vLLM's caching of token-aligned blocks, off: compacted blocks do not hold the tokens those hashes
        name. The scheduler caches anchor blocks instead (after the step that made them final)."""
        self.num_cached_block.setdefault(request.request_id, 0)  # vLLM's mark of a running request

    def _has_partial_local_hit(self, new_computed_blocks, num_local_computed_tokens) -> bool:
        return False  # a hit is whole anchor blocks; it ends on an anchor, not on a block boundary of tokens

    def pop_blocks_for_free(self, request_id: str):
        self.dropped.pop(request_id, None)  # freed or preempted: a recomputation starts from nothing
        return super().pop_blocks_for_free(request_id)
