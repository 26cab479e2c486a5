"""What the AnSAN attention needs from vLLM's model runner: the step's token ids, and block-table rows that
follow compaction.

- vLLM's attention metadata carries no token ids; its model runner keeps them in the persistent input batch
  (``input_batch.token_ids_cpu``: prompt + generated tokens of every running request, one row per request in
  the order of the step's attention metadata). ``_prepare_inputs`` is wrapped so the batch of the step being
  prepared is at hand when the metadata builder runs.
- ``_update_states`` is wrapped so that, before vLLM appends a running request's new blocks to its block-table
  row, the row drops the blocks past the request's kept slots: the scheduler gave exactly those back to the
  pool after the step that compacted them (:mod:`anllm_ext.vllm.scheduler`), so the row and the scheduler's
  list of blocks stay the same list.

Installed only when the anchor backend is selected, so a plain model's runner is untouched.
"""
from __future__ import annotations

import functools
import threading

from .compaction import KeepRule

_local = threading.local()
_installed = False
_rule = None  # the kept-slot rule of the one model this process serves (the scheduler keeps the same slots)


def install(rule: KeepRule) -> None:
    """Wrap the model runner's ``_prepare_inputs`` and ``_update_states`` (once per process); ``rule``: the
    engine's kept-slot rule (:func:`anllm_ext.vllm.detect.keep_rule`)."""
    global _installed, _rule
    if not isinstance(rule, KeepRule):
        raise TypeError(f"install needs the engine's KeepRule, got {type(rule).__name__}")
    _rule = rule
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original_prepare = GPUModelRunner._prepare_inputs
    original_update = GPUModelRunner._update_states

    @functools.wraps(original_prepare)
    def _prepare_inputs(self, *args, **kwargs):
        _local.input_batch = self.input_batch
        return original_prepare(self, *args, **kwargs)

    @functools.wraps(original_update)
    def _update_states(self, scheduler_output):
        drop_compacted_blocks(self, scheduler_output)
        return original_update(self, scheduler_output)

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._update_states = _update_states
    _installed = True


def token_ids(num_reqs: int, length: int):
    """``token_ids_cpu[:num_reqs, :length]`` of the step being prepared (a numpy view), or None outside a
    step (vLLM's dummy and profiling runs)."""
    batch = getattr(_local, "input_batch", None)
    if batch is None or batch.num_reqs != num_reqs:
        return None
    return batch.token_ids_cpu[:num_reqs, :length]


def num_blocks_per_row(num_reqs: int):
    """Blocks in each request's block-table row for the step being prepared, or None outside a step."""
    batch = getattr(_local, "input_batch", None)
    if batch is None or batch.num_reqs != num_reqs:
        return None
    return batch.block_table.block_tables[0].num_blocks_per_row[:num_reqs]


def drop_compacted_blocks(runner, scheduler_output) -> None:
    """Cut every continuing request's block ids (cached state and block-table row) to the blocks of its kept
    slots; a request resumed after preemption gets all its blocks anew from the scheduler instead."""
    block_size = runner.cache_config.block_size
    tables = runner.input_batch.block_table.block_tables
    if any(t.block_size != block_size for t in tables):
        raise RuntimeError(f"anllm_ext's compaction needs kernel blocks of the cache's block size {block_size}")
    data = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(data.req_ids):
        if req_id in data.resumed_req_ids:
            continue
        state = runner.requests[req_id]
        n = data.num_computed_tokens[i]
        ids = state.prompt_token_ids[:n] + state.output_token_ids[: max(n - len(state.prompt_token_ids), 0)]
        keep = -(-_rule.num_kept(ids) // block_size)
        for block_ids in state.block_ids:
            del block_ids[keep:]
        row = runner.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            for table in tables:
                table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), keep)
