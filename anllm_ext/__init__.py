"""anllm_ext: Anchor-based LLM attention (AnSAN) and KV-cache compaction as PyTorch ops."""
from .layout import Layout, LayoutStart, anchor_tensor, token_layout
from .ops import anchor_attention, anchor_attention_with_lse, compact_kv_, compact_slots_
from . import reference
from .cache import AnchorCache
from .hf import is_patched, patch, patched, unpatch
from .generation import generate, prefill
from .anchors import (
    AC_TOKEN,
    PRESETS,
    add_ac_token,
    decode,
    ep_anchor_ids,
    fewshot_prompt,
    insert_ac,
    resolve_anchors,
    split_sentences,
)

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
    "AnchorCache",
    "patch",
    "patched",
    "unpatch",
    "is_patched",
    "generate",
    "prefill",
    "AC_TOKEN",
    "PRESETS",
    "add_ac_token",
    "decode",
    "ep_anchor_ids",
    "fewshot_prompt",
    "insert_ac",
    "resolve_anchors",
    "split_sentences",
]
