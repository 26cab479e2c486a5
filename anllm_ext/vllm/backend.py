"""The vLLM attention backend of AnLLMs: paged KV cache, AnSAN attention with anllm_ext's op.

vLLM selects it (instead of its CPU backend, :mod:`anllm_ext.vllm.plugin`) for models that carry an anchor
configuration. The KV cache keeps vLLM's CPU layout (``[num_blocks, num_kv_heads, block_size, 2 * head_size]``,
keys then values inside a block), so vLLM's cache allocation, block tables and prefix caching are unchanged.

Per step (the metadata builder, once for all layers): the AnSAN layout of every request's keys comes from
its token ids (vLLM's persistent input batch, ``token_ids_cpu``), so it needs no state of its own: keys sit
in the paged cache at their true positions (after RoPE), and the layout of a prefix is the same whichever
step computed it. Per layer (:class:`AnchorAttentionImpl`): the new keys/values are written into their
slots; then per request group (all decodes together, each prefill chunk alone) the keys are gathered
from the requests' blocks into one padded batch (one copy per KV head, not repeated for GQA) and
:func:`anllm_ext.anchor_attention` attends the group's queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from ..layout import Layout, token_layout
from ..ops import anchor_attention
from . import runner_state
from .detect import anchor_config_of


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
    k_block: torch.Tensor  # [b, S] block holding each request's t-th key (0: padding)
    k_offset: torch.Tensor  # [b, S] its offset inside the block
    q_layout: Layout  # [b, Q]
    k_layout: Layout  # [b, S]


@dataclass
class AnchorAttentionMetadata:
    """One step, shared by all layers: the new tokens' slots and the request groups. All decoding requests
    (one query each) form one group; every prefill chunk is a group of its own, so no request is padded
    to another's query length."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] flat slot (block * block_size + offset) of each new token
    groups: List[RequestGroup]


class AnchorMetadataBuilder(AttentionMetadataBuilder[AnchorAttentionMetadata]):
    """Builds :class:`AnchorAttentionMetadata` from vLLM's common metadata and the requests' token ids."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = anchor_config_of(vllm_config.model_config)
        if config is None:  # the plugin selects this backend for AnLLMs only
            raise RuntimeError("the anllm_ext attention backend was selected for a model without an anchor configuration")
        self.anchor_ids = torch.tensor(config.anchor_ids, dtype=torch.int64)
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AnchorAttentionMetadata:
        m = common_attn_metadata
        B = m.num_reqs
        qsl = m.query_start_loc_cpu[: B + 1].to(torch.int64)
        seq_lens = m.seq_lens[:B].to("cpu", torch.int64)
        q_lens = qsl[1:] - qsl[:-1]
        token_ids = runner_state.token_ids(B, max(int(seq_lens.max()), 1))
        block_table = m.block_table_tensor[:B].to("cpu", torch.int64)
        decodes = (q_lens == 1).nonzero().flatten().tolist()
        prefills = (q_lens > 1).nonzero().flatten().tolist()
        groups = [self._group(rows, qsl, seq_lens, token_ids, block_table)
                  for rows in ([decodes] if decodes else []) + [[r] for r in prefills]]
        return AnchorAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=m.slot_mapping[: m.num_actual_tokens].to(self.device, torch.int64),
            groups=groups,
        )

    def _group(self, rows, qsl, seq_lens, token_ids, block_table) -> RequestGroup:
        rows = torch.tensor(rows, dtype=torch.int64)
        starts, lens = qsl[rows], seq_lens[rows]
        q_lens = qsl[rows + 1] - starts
        b, S, Q = len(rows), max(int(lens.max()), 1), int(q_lens.max())
        t = torch.arange(S)[None, :]
        valid = t < lens[:, None]
        if token_ids is None:  # a dummy/profiling run outside a scheduled step: no real requests
            ids = torch.zeros(b, S, dtype=torch.int64)
        else:
            ids = torch.from_numpy(np.ascontiguousarray(token_ids[rows.numpy(), :S])).to(torch.int64)
        k_layout = token_layout(torch.where(valid, ids, 0), self.anchor_ids, valid)
        # the j-th query of a request is its key (seq_len - q_len + j)
        j = torch.arange(Q)[None, :]
        q_valid = j < q_lens[:, None]
        q_col = torch.where(q_valid, lens[:, None] - q_lens[:, None] + j, 0)
        q_layout = Layout(*(x.gather(1, q_col) for x in k_layout.as_tuple()[:3]), q_valid)
        blocks = block_table[rows]
        k_block = torch.where(valid, blocks.gather(1, (t // self.block_size).clamp_max(blocks.shape[1] - 1).expand(b, S)), 0)
        device = self.device
        return RequestGroup(
            q_index=torch.where(q_valid, starts[:, None] + j, 0).to(device),
            k_block=k_block.to(device),
            k_offset=(t % self.block_size).expand(b, S).to(device),
            q_layout=q_layout.to(device),
            k_layout=Layout(*k_layout.as_tuple()).to(device),
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
            out = anchor_attention(q, k, v, g.q_layout, g.k_layout, self.scale).permute(0, 2, 1, 3)  # [b, Q, Hq, D]
            valid = g.q_layout.valid
            output[g.q_index[valid]] = out[valid].to(output.dtype)
        return output
