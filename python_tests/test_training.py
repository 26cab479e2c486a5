"""AnSAN training: the data rules, the Trainer run, saving/loading an AnLLM, LoRA, and bad inputs.

The pipeline tests use the bundled SmolLM2 tokenizer (the real vocabulary: EP periods merged with other
characters, the added <AC> token) on a tiny random Llama so that training steps take a fraction of a second.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anllm_ext
from anllm_ext.config import AnchorConfig
from anllm_ext.data import AnchorDataCollator, encode_document, load_documents, split_blocks
from anllm_ext.layout import token_layout
from anllm_ext.reference import ansan_mask
from helpers import (needs_datasets, TEXT, assert_step_matches_eager, make_anchor_config, needs_smollm2, run_training,
                     tiny_causal_lm)


def tok_and_model(path):
    from anllm_ext.models import load_model

    return load_model(path)


# ------------------------------------------------------------------------------------------ data rules
def test_split_blocks_cuts_at_anchors_and_only_inside_overlong_segments():
    A = 9
    ids = [1, 2, A, 3, 4, 5, A, 6, A, 7, 7, 7, 7, 7, 7, 7, A, 8]
    blocks = split_blocks(ids, [A], block_size=5)
    assert sum(blocks, []) == ids  # nothing lost or reordered
    assert all(len(b) <= 5 for b in blocks)
    assert blocks[0] == [1, 2, A] and blocks[1] == [3, 4, 5, A] and blocks[2] == [6, A]
    assert blocks[3] == [7, 7, 7, 7, 7] and blocks[4] == [7, 7, A, 8]
    with pytest.raises(ValueError, match="block_size"):
        split_blocks(ids, [A], 1)


@needs_smollm2
def test_ac_blocks_have_an_anchor_after_every_sentence(tiny_dir):
    model, tok = tok_and_model(tiny_dir)
    config = make_anchor_config("ac", tok, model)
    blocks = encode_document(TEXT, tok, config, block_size=512)
    assert len(blocks) == 1
    ac = config.anchor_ids[0]
    sentences = anllm_ext.split_sentences(TEXT)
    assert blocks[0].count(ac) == len(sentences) == 8
    assert blocks[0][-1] == ac
    # small blocks end at a sentence's anchor
    for b in encode_document(TEXT, tok, config, block_size=24):
        assert len(b) <= 24 and b[-1] == ac


@needs_smollm2
def test_ep_blocks_split_at_periods(tiny_dir):
    _, tok = tok_and_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    blocks = encode_document(TEXT, tok, config, block_size=20)
    assert len(blocks) > 2
    for b in blocks[:-1]:
        assert b[-1] in config.anchor_ids or len(b) == 20


def test_collator_pads_right_and_masks_labels():
    batch = AnchorDataCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert AnchorDataCollator(0, pad_to_multiple_of=4)([{"input_ids": [1]}])["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="no tokens"):
        AnchorDataCollator(0)([{"input_ids": []}])


@needs_smollm2
def test_rows_never_see_each_other(tiny_dir):
    """A padded training batch: every row's logits equal the row run alone, and the layout the patched model
    uses follows the AnSAN mask rule (docs/method.md) inside each row (padding invisible)."""
    model, tok = tok_and_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    anllm_ext.patch(model, config.anchor_ids)
    rows = encode_document(TEXT * 2, tok, config, block_size=40)[:3]
    batch = AnchorDataCollator(tok.pad_token_id)([{"input_ids": r} for r in rows])
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for b, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r])).logits[0]
            torch.testing.assert_close(together[b, : len(r)], alone, atol=1e-5, rtol=1e-5)
    lay = token_layout(batch["input_ids"], config.anchor_ids, batch["attention_mask"])
    allowed = ansan_mask(lay, lay)
    for b, r in enumerate(rows):
        assert not allowed[b, :, len(r):].any() and not allowed[b, len(r):, :].any()


@needs_datasets
def test_load_documents_text_jsonl_parquet(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("First document. Two sentences.")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "rows.jsonl").write_text('{"body": "Row one."}\n{"body": "Row two."}\n')
    datasets.Dataset.from_dict({"body": ["Parquet row."]}).to_parquet(str(tmp_path / "p.parquet"))
    docs = load_documents(tmp_path, text_field="body")
    assert sorted(docs["text"]) == sorted(["First document. Two sentences.", "Row one.", "Row two.", "Parquet row."])
    with pytest.raises(ValueError, match="no field 'text'"):
        load_documents(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_documents(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown file type"):
        load_documents(tmp_path / "x.bin")


# ------------------------------------------------------------------------------------------ the loss
@needs_smollm2
def test_training_loss_and_grads_equal_eager_dense_mask(tiny_dir):
    """The loss the Trainer optimises (patched model, collated batch with labels) and its gradients equal
    eager attention with the dense AnSAN mask (docs/method.md)."""
    model, tok = tok_and_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    rows = encode_document(TEXT * 2, tok, config, block_size=48)[:3]
    batch = AnchorDataCollator(tok.pad_token_id)([{"input_ids": r} for r in rows])
    assert_step_matches_eager(model, batch, config.anchor_ids, lambda lay: ansan_mask(lay, lay)[:, None])


# ------------------------------------------------------------------------------------------ runs
@needs_smollm2
def test_train_reduces_loss_saves_and_restores_anchor_inference(tmp_path, tiny_dir, corpus):
    res = run_training(tmp_path, tiny_dir, corpus / "train", eval_data=[str(corpus / "eval.txt")])
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    before, after = res["eval_before"]["modes"], res["eval_after"]["modes"]
    assert after["ansan"]["perplexity"] < before["ansan"]["perplexity"]
    # the anchor-cached path scores what one masked pass scores
    assert abs(after["cached"]["nll"] - after["ansan"]["nll"]) < 1e-4
    assert after["cached"]["kv_kept"] < 1.0
    out = tmp_path / "out"
    saved = json.loads((out / "anllm_results.json").read_text())
    assert saved["train_steps"] == 12 and saved["anchor_config"]["mode"] == "ep"
    # load back: patch(model) with no ids restores the trained anchors
    from anllm_ext.models import load_model

    model, tok = load_model(out)
    assert AnchorConfig.from_model(model).anchor_ids == res["anchor_config"]["anchor_ids"]
    anllm_ext.patch(model)
    assert anllm_ext.hf.patched_anchor_ids(model).tolist() == res["anchor_config"]["anchor_ids"]


@needs_smollm2
def test_train_bf16_mixed_precision(tmp_path, tiny_dir, corpus):
    """--bf16 (the Trainer's autocast; on CPU here): the anchor kernels run forward and backward in bf16,
    the fp32 master weights train, and the loss falls as in fp32."""
    res = run_training(tmp_path, tiny_dir, corpus / "train", bf16=True, eval_blocks=0)
    fp32 = run_training(tmp_path / "fp32", tiny_dir, corpus / "train", eval_blocks=0)
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    ref = [h["loss"] for h in fp32["log_history"] if "loss" in h]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert max(abs(a - b) for a, b in zip(losses, ref)) > 0  # bf16 really took effect
    assert abs(sum(losses[-3:]) - sum(ref[-3:])) / 3 < 0.1 * sum(ref[-3:]) / 3  # within 10% of fp32
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())


@needs_smollm2
def test_cli_generate_restores_a_trained_models_anchors(tmp_path, tiny_dir, corpus, capsys):
    from anllm_ext.cli import main

    run_training(tmp_path, tiny_dir, corpus / "train", anchor_mode="ac", max_steps=1, eval_blocks=0)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "out"), "--prompt", TEXT, "--max-new-tokens", "3",
                 "--no-progress", "--anchor-only"]) == 0
    out = capsys.readouterr().out
    # AC mode restored: the prompt got an <AC> after each of its 8 sentences (the last one is left open)
    assert "anchors: ac (1 ids, 7 in the prompt)" in out, out


@needs_smollm2
def test_saved_model_loads_with_plain_transformers_without_anllm_ext(tmp_path, tiny_dir, corpus):
    run_training(tmp_path, tiny_dir, corpus / "train", max_steps=1, eval_blocks=0)
    code = (
        "import sys; sys.modules['anllm_ext'] = None\n"
        "import torch, transformers as tf\n"
        f"m = tf.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
        "print(m.config.anllm['mode'], m(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "ep"


def test_patch_without_ids_on_a_model_without_anchor_config_raises():
    model = tiny_causal_lm(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=None)
    with pytest.raises(ValueError, match="carries no anchor configuration"):
        anllm_ext.patch(model)
    AnchorConfig("ids", [3]).attach(model)
    anllm_ext.patch(model)
    assert anllm_ext.hf.patched_anchor_ids(model).tolist() == [3]


@needs_smollm2
def test_lora_ac_adapter_round_trip(tmp_path, tiny_dir, corpus):
    """LoRA in AC mode: the <AC> row trains, the adapter is small, and the adapter directory, the merged
    directory and the in-memory model give the same logits."""
    res = run_training(tmp_path, tiny_dir, corpus / "train", anchor_mode="ac", lora=True, lora_r=4, max_steps=3,
                    eval_blocks=2, adapter_dtype="float32")
    from anllm_ext.models import load_model

    out = tmp_path / "out"
    adapter_bytes = os.path.getsize(out / "adapter" / "adapter_model.safetensors")
    full_bytes = os.path.getsize(out / "model.safetensors")
    assert adapter_bytes < full_bytes / 4  # no embedding matrix in the adapter
    merged, tok = load_model(out)
    from_adapter, _ = load_model(out / "adapter")
    ac = tok.convert_tokens_to_ids("<AC>")
    assert AnchorConfig.from_model(from_adapter).anchor_ids == [ac] == res["anchor_config"]["anchor_ids"]
    base, _ = load_model(tiny_dir)
    assert not torch.equal(merged.get_input_embeddings().weight[ac], base.get_input_embeddings().weight[tok.convert_tokens_to_ids(".")])
    ids = tok(anllm_ext.insert_ac(TEXT), return_tensors="pt")["input_ids"]
    anllm_ext.patch(merged), anllm_ext.patch(from_adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, from_adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_run_on_an_adapter_continues_that_adapter(tmp_path, tiny_dir, corpus):
    """`--model ADAPTER --lora` goes on training that adapter (not a second one on its merged model): the run
    starts where the first ended (same held-out perplexities), keeps its rank, and saves an adapter whose
    base model is the first one's base, which loads as the merged model does."""
    from peft import LoraConfig

    from anllm_ext.models import load_model

    first = run_training(tmp_path / "a", tiny_dir, corpus / "train", lora=True, lora_r=4, max_steps=3,
                         adapter_dtype="float32")
    adapter = tmp_path / "a" / "out" / "adapter"
    second = run_training(tmp_path / "b", adapter, corpus / "train", lora=True, max_steps=3, adapter_dtype="float32")
    for mode in ("full", "ansan", "cached"):
        assert second["eval_before"]["modes"][mode]["perplexity"] == pytest.approx(
            first["eval_after"]["modes"][mode]["perplexity"], rel=1e-4)
    assert second["eval_after"]["modes"]["cached"]["perplexity"] < first["eval_after"]["modes"]["cached"]["perplexity"]
    out = tmp_path / "b" / "out"
    assert LoraConfig.from_pretrained(str(out / "adapter")).r == 4
    assert AnchorConfig.from_pretrained(out / "adapter").base_model == str(Path(tiny_dir).resolve())
    merged, tok = load_model(out)
    from_adapter, _ = load_model(out / "adapter")
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    anllm_ext.patch(merged), anllm_ext.patch(from_adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, from_adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="LoRA adapter with lora_r=4; --lora-r 8 cannot apply"):
        run_training(tmp_path / "c", adapter, corpus / "train", lora=True, lora_r=8, max_steps=1)


def test_continued_adapter_keeps_its_anchors_unless_other_punctuation_is_asked(tmp_path, tiny_dir, corpus):
    """Training a trained AnLLM further keeps its saved anchors when only the mode (or its own punctuation) is
    named; other punctuation (e.g. clause anchors ``.;:``) trains it on those, and the adapter saves them."""
    run_training(tmp_path / "a", tiny_dir, corpus / "train", lora=True, lora_r=4, max_steps=1)
    adapter = tmp_path / "a" / "out" / "adapter"
    saved = AnchorConfig.from_pretrained(adapter)
    for name, punctuation in (("same", "."), ("clauses", ".;:")):
        res = run_training(tmp_path / name, adapter, corpus / "train", lora=True, max_steps=1, anchor_mode="ep",
                           punctuation=punctuation)
        after = AnchorConfig.from_pretrained(tmp_path / name / "out" / "adapter")
        assert after.punctuation == punctuation and res["anchor_config"]["anchor_ids"] == after.anchor_ids
    assert AnchorConfig.from_pretrained(tmp_path / "same" / "out" / "adapter").anchor_ids == saved.anchor_ids
    assert set(saved.anchor_ids) < set(after.anchor_ids)


# ------------------------------------------------------------------------------------------ bad inputs
@needs_smollm2
def test_bad_inputs_give_clear_errors(tmp_path, tiny_dir, corpus):
    from anllm_ext.training import AnLLMArguments

    with pytest.raises(ValueError, match="unknown anchor mode"):
        AnLLMArguments(data=["x"], anchor_mode="xx")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty document"):
        run_training(tmp_path, tiny_dir, empty)
    with pytest.raises(ValueError, match="no training data"):
        from anllm_ext.training import AnLLMTrainingArguments, train

        train(AnLLMArguments(), AnLLMTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True))
    # a tokenizer whose vocabulary has no sentence-final period
    _, tok = tok_and_model(tiny_dir)
    with pytest.raises(ValueError, match="no token of this vocabulary ends a sentence with '¶'"):
        make_anchor_config("ep", tok, punctuation="¶")
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        make_anchor_config("ids", tok, anchor_ids=[10 ** 7])


@needs_smollm2
def test_token_budget_stops_and_checkpoints_the_last_step(tmp_path, tiny_dir, corpus):
    res = run_training(tmp_path, tiny_dir, corpus / "train", max_steps=50, max_tokens=300, eval_blocks=0)
    steps = res["train_steps"]
    assert 1 <= steps < 50 and res["train_tokens"] >= 300
    # the step before the last had not reached the budget: it stopped as soon as it could
    tokens = [h["num_input_tokens_seen"] for h in res["log_history"] if "loss" in h]
    assert tokens[-2] < 300 <= tokens[-1]
    assert (tmp_path / "out" / f"checkpoint-{steps}").is_dir()  # resumable where it stopped


@needs_smollm2
def test_bundled_anllm_beats_the_untrained_model_under_anchor_inference():
    """The bundled adapter (docs/training.md, "The bundled AnLLM") loads by name with its anchors, and on text it never saw (the
    bundled paragraph) its anchor-cached perplexity is far below the untrained model's."""
    from anllm_ext.evaluation import perplexity
    from anllm_ext.models import load_model
    from anllm_ext.sample_text import BUNDLED_PARAGRAPH

    trained, tok = load_model("smollm2-anllm")
    anllm_ext.patch(trained)
    ids = tok(BUNDLED_PARAGRAPH)["input_ids"]
    base, _ = load_model()
    anchors = anllm_ext.hf.patched_anchor_ids(trained)
    anllm_ext.patch(base, anchors)
    ppl = {name: perplexity(m, [ids], modes=("cached",), prefill_chunk=64, progress=False)["cached"].perplexity
           for name, m in (("trained", trained), ("base", base))}
    assert ppl["trained"] < 0.6 * ppl["base"], ppl


@needs_smollm2
def test_full_fine_tuning_of_the_bundled_anllm_trains_every_weight(tmp_path, corpus):
    """`anllm train --model smollm2-anllm` without --lora fine-tunes the merged model: every weight trains
    (PEFT loads an inference adapter's base frozen, and the merged model kept that), one step moves the model."""
    from anllm_ext.models import load_model

    bundled, tok = load_model("smollm2-anllm")
    assert all(p.requires_grad for p in bundled.parameters())
    res = run_training(tmp_path, "smollm2-anllm", corpus / "train", max_steps=1, block_size=64,
                       per_device_train_batch_size=1, eval_blocks=0, learning_rate=1e-5)
    assert res["train_steps"] == 1
    trained, _ = load_model(tmp_path / "out")
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        diff = (trained(input_ids=ids).logits - bundled(input_ids=ids).logits).abs().max().item()
    assert 0 < diff < 1, diff


@needs_smollm2
def test_lora_run_goes_on_training_the_bundled_anllm(tmp_path, corpus):
    """`anllm train --model smollm2-anllm --lora`: the bundled adapter goes on training (one step on the real
    model); the saved adapter keeps its rank and names the bundled base model, so it loads by path anywhere."""
    from peft import LoraConfig

    from anllm_ext.models import bundled_anllm_dir, load_model

    res = run_training(tmp_path, "smollm2-anllm", corpus / "train", lora=True, max_steps=1, block_size=64,
                       per_device_train_batch_size=1, eval_blocks=0, learning_rate=1e-5, merge_lora=False)
    assert res["train_steps"] == 1
    adapter = tmp_path / "out" / "adapter"
    assert LoraConfig.from_pretrained(str(adapter)).r == LoraConfig.from_pretrained(str(bundled_anllm_dir())).r
    assert AnchorConfig.from_pretrained(adapter).base_model == "bundled"
    trained, _ = load_model(adapter)
    bundled, tok = load_model("smollm2-anllm")
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():  # one small step from the bundled adapter: moved, but close (a new adapter on the
        diff = (trained(input_ids=ids).logits - bundled(input_ids=ids).logits).abs().max().item()  # base: far)
    assert 0 < diff < 1, diff
