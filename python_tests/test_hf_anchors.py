"""AC / EP anchor conventions: EP vocabulary rule, sentence splitter, <AC> token, presets, CLI."""

import pytest
import torch

import anllm_ext
from anllm_ext import anchors as A
from anllm_ext.config import resolve_anchors

from helpers import needs_smollm2, tiny_causal_lm


def test_sentence_end_token_rule():
    for t in [".", " .", ".)", ").", '."', '".', ".\n", ".”", "].", ".**"]:
        assert A.is_sentence_end_token(t), t
    for t in ["...", "..", ".,", "._", "etc.", "3.", "a", ".(", "!"]:
        assert not A.is_sentence_end_token(t), t
    assert A.is_sentence_end_token("!", punctuation=".!?")
    assert A.is_sentence_end_token("?)", punctuation=".!?")


def test_split_sentences_round_trip_and_rules():
    text = ('Hello world. This is Mr. Smith, e.g. a man!  He said "yes." Then (see below.) it ended...\n\n'
            "Heading\n\nNext one? Yes. Pi is 3.14 roughly. J. R. R. Tolkien wrote it.")
    parts = A.split_sentences(text)
    assert "".join(parts) == text
    assert parts[:3] == ["Hello world. ", "This is Mr. Smith, e.g. a man!  ", 'He said "yes." ']
    assert "Pi is 3.14 roughly. " in parts
    assert parts[-1] == "J. R. R. Tolkien wrote it."


def test_insert_ac_and_fewshot():
    assert A.insert_ac("One. Two!\nThree") == "One.<AC> Two!<AC>\nThree<AC>"
    assert A.insert_ac("One. Two", close_last=False) == "One.<AC> Two"
    p = A.fewshot_prompt(["Q: 1+1? A: 2.", "Q: 2+2? A: 4."], "Q: 3+3? A:")
    assert p == "Q: 1+1?<AC> A: 2.<AC>\n\nQ: 2+2?<AC> A: 4.<AC>\n\nQ: 3+3?<AC> A:"


def test_presets_and_resolve():
    assert A.PRESETS["anllm-ac"].anchor_ids == (32001,) and A.PRESETS["anllm-ac"].pad_id == 32000
    assert A.PRESETS["anllm-ep"].anchor_ids == (29889,)
    assert resolve_anchors("anllm-ep") == [29889]
    assert resolve_anchors("13, 30") == [13, 30]
    with pytest.raises(ValueError):
        resolve_anchors("bogus")


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    from anllm_ext.models import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)


def _tiny_llama(vocab):
    return tiny_causal_lm(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


@needs_smollm2
@pytest.mark.parametrize("init", ["period", "mean"])
def test_add_ac_token(tokenizer, init):
    model = _tiny_llama(len(tokenizer))
    emb_before = model.get_input_embeddings().weight.detach().clone()
    ac = A.add_ac_token(tokenizer, model, init=init)
    assert ac == len(tokenizer) - 1 and A.add_ac_token(tokenizer, model, init=init) == ac
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer)
    (period,) = tokenizer.encode(".", add_special_tokens=False)
    want = emb_before[period] if init == "period" else emb_before.mean(0)
    torch.testing.assert_close(emb[ac].detach(), want)
    torch.testing.assert_close(model.get_output_embeddings().weight.shape[0], len(tokenizer))
    ids = tokenizer(A.insert_ac("The cat sat. The dog ran."))["input_ids"]
    assert ids.count(ac) == 2 and ids[-1] == ac
    assert A.decode(tokenizer, ids) == "The cat sat. The dog ran."
    # anchor inference with <AC> anchors works end to end
    anllm_ext.patch(model, ac)
    x = torch.tensor([ids])
    out, cache = anllm_ext.generate(model, x, max_new_tokens=3, prefill_chunk=4, return_cache=True)
    assert out.shape == (1, len(ids) + 3)
    assert cache.compactions > 0


@needs_smollm2
def test_ep_ids_cover_merged_periods(tokenizer):
    ids = A.ep_anchor_ids(tokenizer)
    dec = [tokenizer.decode([i]) for i in ids]
    assert "." in dec and ".)" in dec and ")." in dec
    assert all(A.is_sentence_end_token(d) for d in dec)
    more = A.ep_anchor_ids(tokenizer, ".!?")
    assert set(ids) < set(more)
