"""User paths, as a transformers user walks them: no silent wrong result after the attention
implementation or the cache is swapped behind the patch, anchors that survive save/load, right padding,
static caches, folders for `anllm eval --text`, and a clear error for each class of bad argument (chunk
sizes, batch sizes, token budgets, anchor ids, paths, encodings, dtypes, devices)."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import anllm_ext
from anllm_ext import AnchorCache, is_patched, patch, unpatch
from anllm_ext.config import AnchorConfig
from anllm_ext.errors import UnsupportedError
from anllm_ext.hf import cache_kwarg, patched_anchor_ids

from helpers import (needs_datasets, MODEL_ANCHOR as ANCHOR, generated_cache, model_stream, needs_smollm2, single_pass_logits,
                     tiny_causal_lm, tiny_model)

GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------- attention implementation swaps


def issue_model():
    """A reproduction: a tiny Llama and a prompt with anchors (id 5) at 4, 9 and 15."""
    m = tiny_causal_lm(vocab_size=64, hidden_size=80, intermediate_size=128, pad_token_id=0, eos_token_id=2)
    ids = torch.randint(6, 64, (1, 20)); ids[:, [4, 9, 15]] = 5
    return m, ids


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_issue_repro_set_attn_implementation_lifts_the_patch(impl):
    m, ids = issue_model()
    plain = copy.deepcopy(m)
    plain.set_attn_implementation(impl)
    want_plain = plain.generate(ids, **GREEDY)
    anllm_ext.patch(m, [5])
    want_anchor = m.generate(ids, **GREEDY)
    m.set_attn_implementation(impl)  # the transformers way back: the patch is lifted, not left half-on
    assert not is_patched(m) and m.config._attn_implementation == impl
    assert torch.equal(m.generate(ids, **GREEDY), want_plain)
    anllm_ext.patch(m, [5])  # and patching again gives the anchor model back
    assert m.config._attn_implementation == "anllm"
    assert torch.equal(m.generate(ids, **GREEDY), want_anchor)


@pytest.mark.parametrize("swap", ["config attribute", "decoder submodule"])
def test_attention_switched_behind_the_patch_raises_and_patch_repairs(swap):
    model = patch(tiny_model("llama"), ANCHOR)
    ids, _ = model_stream(1, 20, seed=3)
    want = model.generate(ids, **GREEDY)
    if swap == "config attribute":
        model.config._attn_implementation = "sdpa"
    else:
        model.model.set_attn_implementation("sdpa")
    with pytest.raises(UnsupportedError, match="switched to 'sdpa' behind the patch"):
        model.generate(ids, **GREEDY)
    with pytest.raises(UnsupportedError, match="anllm_ext.patch"):
        model(input_ids=ids, use_cache=False)
    patch(model, ANCHOR)
    assert model.config._attn_implementation == "anllm"
    assert torch.equal(model.generate(ids, **GREEDY), want)


@pytest.mark.parametrize("impl", ["static", "offloaded_static"])
def test_static_cache_implementation_is_refused_clearly(impl):
    model = patch(tiny_model("llama"), ANCHOR)
    ids, _ = model_stream(1, 20, seed=4)
    with pytest.raises(UnsupportedError, match=rf"got cache_implementation='{impl}'.*static.*AnchorCache"):
        model.generate(ids, cache_implementation=impl, **GREEDY)


def test_user_built_caches_are_exact_or_refused():
    model = patch(tiny_model("llama", seed=1), ANCHOR)
    ids, mask = model_stream(2, 20, seed=5, left_pad=(0, 3))
    kw = dict(attention_mask=mask, **GREEDY)
    want = model.generate(ids, **kw)
    name = cache_kwarg(model)
    for cache in (DynamicCache(), DynamicCache(config=model.config), AnchorCache(model)):
        assert torch.equal(model.generate(ids, **{name: cache}, **kw), want), type(cache).__name__
    assert torch.equal(model.generate(ids, cache_implementation="dynamic", **kw), want)
    with pytest.raises(UnsupportedError, match="got a StaticCache"):
        model.generate(ids, **{name: StaticCache(config=model.config, max_cache_len=64)}, **kw)
    with pytest.raises(UnsupportedError, match="got a StaticCache"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{name: StaticCache(config=model.config, max_cache_len=64)})
    filled = DynamicCache()
    with torch.no_grad():
        unpatch(model)
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{name: filled})
        patch(model, ANCHOR)
    with pytest.raises(ValueError, match="not processed by the patched model"), torch.no_grad():
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **{name: filled})
    with pytest.raises(UnsupportedError, match="continuous batching"):
        model.set_attn_implementation("paged|sdpa")
    assert is_patched(model)


def test_right_padded_generate_gets_transformers_advice():
    model = patch(tiny_model("llama"), ANCHOR)
    ids, _ = model_stream(2, 12, seed=6)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match=r"right padding.*padding_side='left'"):
        model.generate(ids, attention_mask=mask, **GREEDY)
    with pytest.raises(ValueError, match=r"right padding.*padding_side='left'"):
        anllm_ext.generate(model, ids, mask, max_new_tokens=3, pad_token_id=0)
    left = torch.ones_like(ids)  # left padding works as before
    left[1, :3] = 0
    assert model.generate(ids, attention_mask=left, **GREEDY).shape == (2, 20)


# ------------------------------------------------------------------- PEFT models


def test_a_peft_model_is_patched_where_generate_runs():
    """A PEFT LoRA model, patched as a user holds it: PeftModel.generate calls its base model's generate, past the
    wrapper's forward, so the patch must sit on the transformers model under it. Exact against the merged model
    (logits, greedy tokens from an AnchorCache, left-padded batch); unpatch gives the plain PEFT model back."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # random B: the adapter counts
    model = peft.get_peft_model(tiny_model("llama"), lora).eval()
    merged = copy.deepcopy(model).merge_and_unload()
    ids, mask = model_stream(2, 24, seed=8, left_pad=(0, 5))
    keep = mask.bool()
    plain = single_pass_logits(model, ids, mask)
    with pytest.raises(ValueError, match="anllm_config.json"):  # a PEFT model carries no anchors by itself
        patch(model)
    assert patch(model, ANCHOR) is model and is_patched(model) and patched_anchor_ids(model).tolist() == [ANCHOR]
    patch(merged, ANCHOR)
    torch.testing.assert_close(single_pass_logits(model, ids, mask)[keep], single_pass_logits(merged, ids, mask)[keep],
                               atol=1e-5, rtol=1e-5)
    out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
    want = merged.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert isinstance(generated_cache(out), AnchorCache)
    assert torch.equal(out.sequences, want)
    unpatch(model)
    assert not is_patched(model)
    torch.testing.assert_close(single_pass_logits(model, ids, mask)[keep], plain[keep], atol=0, rtol=0)


# ------------------------------------------------------------------- save / load


def test_patched_model_saves_its_anchors(tmp_path):
    model = patch(tiny_model("llama", seed=2), [9, ANCHOR])
    ids, mask = model_stream(2, 24, seed=7, left_pad=(0, 4))
    want = single_pass_logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    patch(loaded)  # no ids: the saved ones
    assert patched_anchor_ids(loaded).tolist() == [ANCHOR, 9]
    keep = mask.bool()
    torch.testing.assert_close(single_pass_logits(loaded, ids, mask)[keep], want[keep], atol=0, rtol=0)
    unpatch(model)  # the config carries again what it carried before the patch: nothing
    assert AnchorConfig.from_model(model) is None
    with pytest.raises(ValueError, match="saved by save_pretrained while patched"):
        patch(model)


def test_a_trained_anchor_configuration_is_kept():
    model = tiny_model("llama")
    trained = AnchorConfig("ep", [ANCHOR], punctuation=".")
    trained.attach(model)
    patch(model)
    assert AnchorConfig.from_model(model) == trained
    with anllm_ext.patched(model, [ANCHOR, 9]):  # another set for a while: the config says so
        assert AnchorConfig.from_model(model).anchor_ids == [ANCHOR, 9]
    assert AnchorConfig.from_model(model) == trained
    unpatch(model)
    assert AnchorConfig.from_model(model) == trained


# ------------------------------------------------------------------- bad arguments: Python API


@pytest.mark.parametrize("chunk", [0, -1, 2.5, "8"])
def test_prefill_chunk_is_validated(chunk):
    model = patch(tiny_model("llama"), ANCHOR)
    ids, _ = model_stream(1, 10, seed=8)
    with pytest.raises((ValueError, TypeError), match=r"prefill_chunk must be an integer >= 1"):
        anllm_ext.generate(model, ids, prefill_chunk=chunk, max_new_tokens=2)
    with pytest.raises((ValueError, TypeError), match=r"prefill_chunk must be an integer >= 1"):
        anllm_ext.prefill(model, ids, prefill_chunk=chunk)


@pytest.mark.parametrize("anchors,error", [([], "empty: give at least one token id"), ([-1], "not token ids"), ([64], "0 to 63"),
                                           ([1.5], "int"), ("5", "int"), (torch.tensor([1.0]), "integer")])
def test_anchor_ids_are_validated(anchors, error):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=error):
        patch(model, anchors)
    assert not is_patched(model)


def test_generate_arguments_are_validated():
    model = patch(tiny_model("llama"), ANCHOR)
    ids, _ = model_stream(1, 10, seed=9)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        anllm_ext.generate(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="input_ids"):
        anllm_ext.generate(model, ids[:, :0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask.*\[1, 10\]"):
        anllm_ext.generate(model, ids, torch.ones(1, 7, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="cache must be an AnchorCache"):
        anllm_ext.generate(model, ids, cache=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, tokens\] integer tensor"):
        anllm_ext.generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="initial_capacity must be an integer >= 1"):
        AnchorCache(model, initial_capacity=0)
    with pytest.raises(ValueError, match="growth must be a number > 1"):
        AnchorCache(model, growth=1)


@pytest.mark.parametrize("kw,error", [(dict(dtype="fp64"), "dtype must be one of"),
                                      (dict(device="gpu"), "device 'gpu'"),
                                      (dict(device="cuda:7"), "not available")])
def test_load_model_validates_dtype_and_device(kw, error, tmp_path):
    from anllm_ext.models import load_model

    with pytest.raises(ValueError, match=error):
        load_model(str(tmp_path), **kw)  # checked before anything loads


@needs_datasets
def test_data_files_empty_jsonl_and_folders(tmp_path):
    from anllm_ext.data import load_documents

    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_documents(tmp_path / "empty.jsonl")
    (tmp_path / "blank.txt").write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_documents(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait.".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        load_documents(tmp_path / "latin1.txt")


def test_multiple_choice_file_encodings(tmp_path):
    from anllm_ext.evaluation import load_multiple_choice

    row = '{"question": "Capital of France?", "choices": ["Paris", "Lyon"], "answer": 0}\n'
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (row * 2).encode("utf-8"))
    assert [q.answer for q in load_multiple_choice(bom)] == [0, 0]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(row.encode("utf-8") + row.replace("France", "S\xe8vres").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8"):
        load_multiple_choice(latin)


# ------------------------------------------------------------------- bad arguments: CLI


def cli_error(argv, capsys):
    """stderr of an `anllm` command line that must fail with exit status 2 (argparse or a clean error)."""
    from anllm_ext.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2, argv
    return capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--prefill-chunk", "0"), ("--prefill-chunk", "-1"),
                                          ("--max-new-tokens", "0"), ("--max-prompt-tokens", "-5"),
                                          ("--threads", "-1"), ("--temperature", "0"), ("--top-p", "1.5")])
def test_cli_generate_numbers(option, value, capsys):
    err = cli_error(["generate", "--model", "/nonexistent", option, value], capsys)
    assert f"argument {option}" in err and "must be" in err


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--prefill-chunk", "0"), ("--block-size", "1"),
                                          ("--max-blocks", "-1"), ("--shots", "-1"), ("--limit", "0")])
def test_cli_eval_numbers(option, value, capsys):
    err = cli_error(["eval", "--model", "/nonexistent", "--text", "x.txt", option, value], capsys)
    assert f"argument {option}" in err and "must be" in err


def test_cli_paths_encodings_devices(tmp_path, capsys):
    latin = tmp_path / "p.txt"
    latin.write_bytes("caf\xe9.".encode("latin-1"))
    err = cli_error(["generate", "--model", "/nonexistent", "--prompt-file", str(latin)], capsys)
    assert "p.txt" in err and "UTF-8" in err
    err = cli_error(["generate", "--model", "/nonexistent", "--prompt-file", str(tmp_path / "missing.txt")], capsys)
    assert "missing.txt" in err and "does not exist" in err
    err = cli_error(["eval", "--model", "/nonexistent", "--mc", str(tmp_path / "q.jsonl")], capsys)
    assert "q.jsonl does not exist" in err
    err = cli_error(["eval", "--model", "/nonexistent", "--text", str(tmp_path / "held_out")], capsys)
    assert "held_out does not exist" in err
    err = cli_error(["generate", "--model", "/nonexistent", "--device", "gpu"], capsys)
    assert "device 'gpu'" in err
    text = tmp_path / "t.txt"
    text.write_text("One. Two.", encoding="utf-8")
    err = cli_error(["eval", "--model", "/nonexistent", "--text", str(text), "--json", str(tmp_path)], capsys)
    assert "--json" in err and "directory" in err


@needs_datasets
def test_cli_eval_refuses_text_without_a_document(tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n \n", encoding="utf-8")
    err = cli_error(["eval", "--model", "/nonexistent", "--text", str(blank)], capsys)
    assert "no non-empty document" in err
    (tmp_path / "empty.jsonl").write_bytes(b"")
    err = cli_error(["eval", "--model", "/nonexistent", "--text", str(tmp_path / "empty.jsonl")], capsys)
    assert "no non-empty document" in err


@needs_datasets
def test_cli_eval_text_takes_folders(tiny_dir, tmp_path, capsys):
    from anllm_ext.cli import main

    folder = tmp_path / "held_out"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("The sun rose. Birds sang in the trees. The day began slowly. " * 3, encoding="utf-8")
    (folder / "sub" / "b.md").write_text("Rain fell all night. The river rose. " * 3, encoding="utf-8")
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a text file: skipped, as `anllm train --data` skips it
    licence = tmp_path / "LICENSE"  # a file named explicitly without a suffix is plain text (e.g. GPL-3)
    licence.write_text("Anyone may copy this text. Nobody may sell it.", encoding="utf-8")
    rc = main(["eval", "--model", tiny_dir, "--text", str(folder), str(licence), "--mode", "ansan,cached",
               "--block-size", "32", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "from 3 document(s) in 3 file(s)" in out


# ------------------------------------------------------------------- the real bundled model


@needs_smollm2
def test_smollm2_attention_swap_and_right_padding():
    from anllm_ext.models import load_model

    model, tok = load_model()
    text = ["The river rose all night. The bridge closed at dawn. Buses took", "Shops opened late. The mayor"]
    left = tok(text, return_tensors="pt", padding=True, padding_side="left")
    right = tok(text, return_tensors="pt", padding=True, padding_side="right")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(**left, **kw)
    anchors = anllm_ext.ep_anchor_ids(tok)
    patch(model, anchors)
    anchored = model.generate(**left, **kw)
    assert torch.equal(anchored, anllm_ext.generate(model, left.input_ids, left.attention_mask, prefill_chunk=8, **kw))
    with pytest.raises(ValueError, match="padding_side='left'"):
        model.generate(**right, **kw)
    model.set_attn_implementation("sdpa")
    assert not is_patched(model)
    assert torch.equal(model.generate(**left, **kw), plain)
    patch(model, anchors)
    assert torch.equal(model.generate(**left, **kw), anchored)
