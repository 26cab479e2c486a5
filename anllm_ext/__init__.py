"""anllm_ext: Anchor-based LLM attention (AnSAN) and KV-cache compaction as PyTorch ops."""
from .layout import Layout, LayoutStart, anchor_tensor, token_layout
from .ops import anchor_attention, anchor_attention_append_, anchor_attention_with_lse, compact_kv_, compact_slots_
from . import reference
from .errors import UnsupportedError

# The transformers integration is imported on first use (importing transformers takes seconds).
_LAZY = {
    "AnchorCache": "cache",
    "RecallConfig": "recall",
    "patch": "hf",
    "patched": "hf",
    "unpatch": "hf",
    "unpatched": "hf",
    "is_patched": "hf",
    "generate": "generation",
    "prefill": "generation",
    "AC_TOKEN": "anchors",
    "PRESETS": "anchors",
    "add_ac_token": "anchors",
    "decode": "anchors",
    "ep_anchor_ids": "anchors",
    "fewshot_prompt": "anchors",
    "insert_ac": "anchors",
    "resolve_anchors": "config",
    "split_sentences": "anchors",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anllm_ext' has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "transformers":
            raise
        raise ImportError(
            f"anllm_ext.{name} needs transformers (the ops do not): pip install 'anllm_ext[hf]'"
        ) from exc
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "Layout",
    "LayoutStart",
    "anchor_tensor",
    "token_layout",
    "anchor_attention",
    "anchor_attention_append_",
    "anchor_attention_with_lse",
    "compact_kv_",
    "compact_slots_",
    "reference",
    "UnsupportedError",
    "AnchorCache",
    "RecallConfig",
    "patch",
    "patched",
    "unpatch",
    "unpatched",
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
