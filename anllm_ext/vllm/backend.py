"""The vLLM attention backend of AnLLMs: paged KV cache, AnSAN attention with anllm_ext's op, compaction.

vLLM selects it (instead of its CPU backend, :mod:`anllm_ext.vllm.plugin`) for models that carry an anchor
configuration. The KV cache keeps vLLM's CPU layout (``[num_blocks, num_kv_heads, block_size, 2 * head_size]``,
keys then values inside a block), so vLLM's cache allocation and block tables are unchanged.

A request's block-table row holds its slots in order: the kept slots (anchors + open segment,
:mod:`anllm_ext.vllm.compaction`) of the tokens computed in earlier steps, then the step's new tokens. Per
step (the metadata builder, once for all layers) the AnSAN layout of those slots comes from the request's
token ids (vLLM's persistent input batch, ``token_ids_cpu``) and the engine's kept-slot rule
(:func:`anllm_ext.vllm.detect.keep_rule`: anchor ids, the model's sink, ``anllm_recent``): keys sit in the cache
at their true positions (after RoPE), and which tokens are kept is a function of the token ids, so the builder
needs no state of its own. Per layer (:class:`AnchorAttentionImpl`): the new keys/values are written into their
slots; per request group (all decodes together, each prefill chunk alone) the keys are gathered from the
requests' blocks into one padded batch (one copy per KV head, not repeated for GQA) and
:func:`anllm_ext.anchor_attention` attends the group's queries; then compaction moves the slots kept after this
step to the front of each request's blocks. The scheduler (:mod:`anllm_ext.vllm.scheduler`) frees the blocks
past them after the step.

With recent sentences kept hot (the engine's ``anllm_recent`` = N, :func:`anllm_ext.vllm.detect.recent_of`) the
kept slots also hold the N sentences closed last, and a non-anchor query also reads the N sentences before its
own: per group the op attends the AnSAN keys with their log-sum-exp, a dense attention over the window slots
(:func:`anllm_ext.recent.attend_window`, planned once per step for all layers) adds the rest, and the two are
merged, as :class:`anllm_ext.AnchorCache` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from ..layout import Layout, token_layout
from ..ops import anchor_attention, anchor_attention_with_lse
from ..recall import merge_partial_attentions
from ..recent import WindowPlan, attend_window, plan_window
from . import runner_state
from .compaction import KeepRule
from .detect import keep_rule


class AnchorAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend with AnSAN attention (same KV cache layout and block sizes)."""

    # the impl writes the new keys/values itself (one place decides where they go)
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "ANLLM_ANCHOR"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return AnchorAttentionImpl

    @staticmethod
    def get_builder_cls():
        return AnchorMetadataBuilder


@dataclass
class RequestGroup:
    """Requests attended in one op call, padded to the group's longest query / key run."""

    q_index: torch.Tensor  # [b, Q] row of each request's j-th query in the step's flat query tensor (0: padding)
    k_block: torch.Tensor  # [b, S] block holding each request's t-th key slot (0: padding)
    k_offset: torch.Tensor  # [b, S] its offset inside the block
    q_layout: Layout  # [b, Q]
    k_layout: Layout  # [b, S]
    window: Optional[WindowPlan] = None  # the recent-sentence part over these keys (None: no query reads one)


@dataclass
class AnchorAttentionMetadata:
    """One step, shared by all layers: the new tokens' slots, the request groups and the compaction. All
    decoding requests (one query each) form one group; every prefill chunk is a group of its own, so no
    request is padded to another's query length."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] flat slot (block * block_size + offset) of each new token
    groups: List[RequestGroup]
    move_from: torch.Tensor  # [m] flat slots whose keys/values move after the attention (compaction) ...
    move_to: torch.Tensor  # [m] ... to these flat slots


@dataclass
class _RequestSlots:
    """One request in one step: which token each of its slots holds (``keys``: the kept slots of the tokens
    computed before, then the step's new tokens) and where its block-table row puts slot s."""

    ids: np.ndarray  # [seq_len] token ids (zeros in vLLM's dummy runs)
    keys: np.ndarray  # [kept + q_len] token index held by each slot
    flat: np.ndarray  # [kept + q_len] flat cache slot of each slot
    q_len: int

    def moves(self, rule: KeepRule) -> tuple:
        """(from, to) flat slots that compaction moves after this step: the slots kept once the step's tokens
        are computed go to the front, in order."""
        src = np.searchsorted(self.keys, rule.kept_indices(self.ids))
        moved = src != np.arange(len(src))
        return self.flat[src[moved]], self.flat[:len(src)][moved]


class AnchorMetadataBuilder(AttentionMetadataBuilder[AnchorAttentionMetadata]):
    """Builds :class:`AnchorAttentionMetadata` from vLLM's common metadata and the requests' token ids.

    A request's row of the block table holds its slots in order: the kept slots of the tokens computed in
    earlier steps (:meth:`anllm_ext.vllm.compaction.KeepRule.kept_indices`, moved to the front by compaction), then the
    step's new tokens. So a new token's slot follows from the kept count, not from its position (vLLM's own
    ``slot_mapping`` is not used), while its position stays the true one."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        rule = keep_rule(vllm_config)
        if rule is None:  # the plugin selects this backend for AnLLMs only
            raise RuntimeError("the anllm_ext attention backend was selected for a model without an anchor configuration")
        self.rule = rule  # the scheduler builds the same from the same engine config
        self.anchor_ids = torch.from_numpy(rule.anchor_ids)
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AnchorAttentionMetadata:
        m = common_attn_metadata
        B = m.num_reqs
        qsl = m.query_start_loc_cpu[: B + 1].to(torch.int64)
        seq_lens = m.seq_lens[:B].to("cpu", torch.int64)
        q_lens = qsl[1:] - qsl[:-1]
        token_ids = runner_state.token_ids(B, max(int(seq_lens.max()), 1))
        row_blocks = runner_state.num_blocks_per_row(B)
        block_table = m.block_table_tensor[:B].to("cpu", torch.int64).numpy()
        reqs = [self._slots(r, int(seq_lens[r]), int(q_lens[r]), token_ids, block_table, row_blocks)
                for r in range(B)]
        decodes = (q_lens == 1).nonzero().flatten().tolist()
        prefills = (q_lens > 1).nonzero().flatten().tolist()
        groups = [self._group(rows, qsl, reqs) for rows in ([decodes] if decodes else []) + [[r] for r in prefills]]
        moves = [r.moves(self.rule) for r in reqs] if token_ids is not None else []
        return AnchorAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=self._cat([r.flat[len(r.flat) - r.q_len:] for r in reqs])[: m.num_actual_tokens],
            groups=groups,
            move_from=self._cat([f for f, _ in moves]),
            move_to=self._cat([t for _, t in moves]),
        )

    def _cat(self, parts) -> torch.Tensor:
        """int64 numpy arrays, concatenated into one tensor on the device."""
        return torch.from_numpy(np.concatenate(parts or [np.zeros(0, np.int64)]).astype(np.int64)).to(self.device)

    def _slots(self, row, seq_len, q_len, token_ids, block_table, row_blocks) -> _RequestSlots:
        ctx = seq_len - q_len
        if token_ids is None:  # a dummy/profiling run outside a scheduled step: no real requests, no anchors
            ids = np.zeros(seq_len, dtype=np.int64)
        else:
            ids = token_ids[row, :seq_len].astype(np.int64)
        keys = np.concatenate([self.rule.kept_indices(ids[:ctx]),
                               np.arange(ctx, seq_len, dtype=np.int64)])
        if row_blocks is not None and len(keys) > int(row_blocks[row]) * self.block_size:
            raise RuntimeError(f"anllm_ext: request row {row} needs {len(keys)} KV slots but its block table holds "
                               f"{int(row_blocks[row])} blocks of {self.block_size}: scheduler and worker disagree")
        s = np.arange(len(keys))
        blocks = block_table[row, np.minimum(s // self.block_size, block_table.shape[1] - 1)]
        return _RequestSlots(ids, keys, blocks * self.block_size + s % self.block_size, q_len)

    def _group(self, rows, qsl, reqs) -> RequestGroup:
        b = len(rows)
        group = [reqs[r] for r in rows]
        L = max(max(len(r.ids) for r in group), 1)
        S = max(max(len(r.keys) for r in group), 1)
        Q = max(r.q_len for r in group)
        ids = torch.zeros(b, L, dtype=torch.int64)
        valid = torch.zeros(b, L, dtype=torch.bool)
        k_col = torch.zeros(b, S, dtype=torch.int64)  # token index of each key slot
        k_valid = torch.zeros(b, S, dtype=torch.bool)
        k_flat = torch.zeros(b, S, dtype=torch.int64)
        for i, r in enumerate(group):
            ids[i, : len(r.ids)] = torch.from_numpy(r.ids)
            valid[i, : len(r.ids)] = True
            k_col[i, : len(r.keys)] = torch.from_numpy(r.keys)
            k_valid[i, : len(r.keys)] = True
            k_flat[i, : len(r.keys)] = torch.from_numpy(r.flat)
        # of every token, at its true position (from 0: the sink's tokens are anchors, as the rule's)
        layout = token_layout(torch.where(valid, ids, 0), self.anchor_ids, valid, sink=self.rule.sink)
        k_layout = Layout(*(x.gather(1, k_col) for x in layout.as_tuple()[:3]), k_valid)
        # the j-th query of a request is its token (seq_len - q_len + j)
        seq_lens = torch.tensor([len(r.ids) for r in group])
        q_lens = torch.tensor([r.q_len for r in group])
        j = torch.arange(Q)[None, :]
        q_valid = j < q_lens[:, None]
        q_col = torch.where(q_valid, seq_lens[:, None] - q_lens[:, None] + j, 0)
        q_layout = Layout(*(x.gather(1, q_col) for x in layout.as_tuple()[:3]), q_valid)
        k_flat = torch.where(k_valid, k_flat, 0)
        device = self.device
        window = plan_window(q_layout, k_layout, self.rule.recent) if self.rule.recent else None
        if window is not None:
            window = window._replace(mask=window.mask.to(device), read=window.read.to(device))
        return RequestGroup(
            q_index=torch.where(q_valid, qsl[rows][:, None] + j, 0).to(device),
            k_block=(k_flat // self.block_size).to(device),
            k_offset=(k_flat % self.block_size).to(device),
            q_layout=q_layout.to(device),
            k_layout=k_layout.to(device),
            window=window,
        )


class AnchorAttentionImpl(AttentionImpl):
    """Writes the step's keys/values into the paged cache, then attends under the AnSAN mask."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window: Optional[int], kv_cache_dtype: str, logits_soft_cap: Optional[float] = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: Optional[str] = None,
                 sinks: Optional[torch.Tensor] = None) -> None:
        unsupported = {"ALiBi": alibi_slopes is not None, "a sliding window": sliding_window is not None,
                       "logits soft-capping": bool(logits_soft_cap), "attention sinks": sinks is not None,
                       f"attention type {attn_type}": attn_type != AttentionType.DECODER,
                       "KV sharing between layers": kv_sharing_target_layer_name is not None,
                       f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype != "auto"}
        bad = [name for name, yes in unsupported.items() if yes]
        if bad:
            raise NotImplementedError(f"anllm_ext's AnSAN attention for vLLM does not support {', '.join(bad)}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.kv_sharing_target_layer_name = None

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Optional[AnchorAttentionMetadata], output: torch.Tensor,
                output_scale: Optional[torch.Tensor] = None, output_block_scale: Optional[torch.Tensor] = None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("anllm_ext's AnSAN attention does not fuse output quantization")
        if attn_metadata is None:  # warm-up
            return output
        m = attn_metadata
        n = m.num_actual_tokens
        nb, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)  # [nb, Hkv, bs, D] each
        # write the new tokens at their slots (keys after RoPE, at their true positions)
        blocks, offsets = m.slot_mapping // bs, m.slot_mapping % bs
        key_cache[blocks, :, offsets] = key[:n].to(key_cache.dtype)
        value_cache[blocks, :, offsets] = value[:n].to(value_cache.dtype)
        for g in m.groups:
            # the group's keys, gathered from its blocks: [b, S, Hkv, D], seen as [b, Hkv, S, D] (not repeated for GQA)
            k = key_cache[g.k_block, :, g.k_offset].permute(0, 2, 1, 3)
            v = value_cache[g.k_block, :, g.k_offset].permute(0, 2, 1, 3)
            q = query[g.q_index].permute(0, 2, 1, 3)  # [b, Hq, Q, D]
            out = self._attend(q, k, v, g).permute(0, 2, 1, 3)  # [b, Q, Hq, D]
            valid = g.q_layout.valid
            output[g.q_index[valid]] = out[valid].to(output.dtype)
        if m.move_from.numel():  # compaction: this layer's kept slots to the front (gathered before written)
            src, dst = (m.move_from // bs, m.move_from % bs), (m.move_to // bs, m.move_to % bs)
            key_cache[dst[0], :, dst[1]] = key_cache[src[0], :, src[1]]
            value_cache[dst[0], :, dst[1]] = value_cache[src[0], :, src[1]]
        return output

    def _attend(self, q, k, v, g: RequestGroup) -> torch.Tensor:
        """The group's AnSAN attention, plus its recent-sentence window when it has one (merged by log-sum-exp)."""
        if g.window is None:
            return anchor_attention(q, k, v, g.q_layout, g.k_layout, self.scale)
        out, lse = anchor_attention_with_lse(q, k, v, g.q_layout, g.k_layout, self.scale)
        out_w, lse_w = attend_window(q, k, v, g.window, self.scale)
        return merge_partial_attentions(out, lse, out_w, lse_w)
