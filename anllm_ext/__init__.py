"""anllm_ext: Anchor-based LLM attention (AnSAN) and KV-cache compaction as PyTorch ops."""
from .layout import Layout, LayoutStart, anchor_tensor, token_layout
from .ops import anchor_attention, anchor_attention_with_lse, compact_kv_, compact_slots_
from . import reference

__all__ = [
    "Layout",
    "LayoutStart",
    "anchor_tensor",
    "token_layout",
    "anchor_attention",
    "anchor_attention_with_lse",
    "compact_kv_",
    "compact_slots_",
    "reference",
]
