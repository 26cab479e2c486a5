"""Training with recalled spans (anllm_ext/training/recall_spans.py, ``anllm train --recall-spans N``): the rows'
chosen sentences, and the loss and gradients of the patched model with ``anllm_recalled`` against eager attention
with a dense mask written here: the AnSAN mask plus, for every real non-anchor query, the recalled tokens of
earlier sentences."""
import pytest
import torch

import anllm_ext
from anllm_ext.data import AnchorDataCollator
from anllm_ext.reference import ansan_mask
from anllm_ext.training.recall_spans import RecallSpanCollator, choose_recalled, sentence_spans
from helpers import assert_step_matches_eager, make_anchor_config, needs_smollm2, run_training, step_features

DOT = 9  # the anchor id of the hand-made rows


def test_sentence_spans_end_at_anchors():
    assert sentence_spans([1, 2, DOT, 3, DOT, 4], [DOT]) == [range(0, 3), range(3, 5)]
    assert sentence_spans([1, 2, 3], [DOT]) == []


def test_the_repeated_sentence_is_recalled_first_then_random_others():
    fact = [11, 12, 13, 14, DOT]
    row = [1, 2, 3, DOT] + fact + [4, 5, 6, DOT, 7, 8, DOT, 20, 12, 13, 14, 21]  # the open sentence quotes the fact
    assert choose_recalled(row, [DOT], 1) == [range(4, 9)]
    two = choose_recalled(row, [DOT], 2)
    assert range(4, 9) in two and len(two) == 2
    assert choose_recalled(row, [DOT], 2) == two  # the same row always gets the same marks
    assert len(choose_recalled(row, [DOT], 10)) == 4  # every closed sentence, no more
    # a sentence with nothing after it is never recalled; a row with no closed sentence recalls nothing
    assert choose_recalled([1, 2, DOT, 3, 4, DOT], [DOT], 5) == [range(0, 3)]
    assert choose_recalled([1, 2, 3], [DOT], 2) == []


def test_collator_marks_the_words_not_the_anchors():
    rows = [[1, 2, 3, DOT, 11, 12, 13, DOT, 11, 12, 13, 4], [DOT, 6]]
    batch = RecallSpanCollator(0, [DOT], spans=1)([{"input_ids": r} for r in rows])
    assert batch["anllm_recalled"].dtype == torch.bool
    assert batch["anllm_recalled"][0].nonzero().squeeze(1).tolist() == [4, 5, 6]
    assert not batch["anllm_recalled"][1].any()  # a sentence of its anchor alone: no word to recall
    plain = AnchorDataCollator(0)([{"input_ids": r} for r in rows])
    for key in plain:
        assert torch.equal(batch[key], plain[key])
    with pytest.raises(ValueError, match="recall spans"):
        RecallSpanCollator(0, [DOT], spans=0)


def dense_recall_span_mask(lay, recalled):
    """[B, 1, T, T]: the AnSAN mask, plus every recalled token of an earlier segment for a real non-anchor query."""
    q_word = (lay.valid & ~lay.is_anchor)[:, :, None]
    k_recalled = (recalled & lay.valid)[:, None, :]
    earlier = lay.segments[:, None, :] < lay.segments[:, :, None]
    return (ansan_mask(lay, lay) | (q_word & k_recalled & earlier))[:, None]


@needs_smollm2
def test_loss_and_grads_with_recalled_spans_equal_eager_dense_mask(tiny_dir):
    from anllm_ext.models import load_model

    model, tok = load_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    batch = RecallSpanCollator(tok.pad_token_id, config.anchor_ids, spans=2)(step_features(tok, config))
    assert batch["anllm_recalled"].sum() > 10
    loss_p = assert_step_matches_eager(model, batch, config.anchor_ids,
                                       lambda lay: dense_recall_span_mask(lay, batch["anllm_recalled"]))
    plain = {k: v for k, v in batch.items() if k != "anllm_recalled"}
    with torch.no_grad():
        assert abs(float(model(**plain).loss) - float(loss_p)) > 1e-4  # the recalled spans changed the loss


@needs_smollm2
def test_recalled_spans_bad_inputs(tiny_dir):
    from anllm_ext.models import load_model
    from anllm_ext.training import AnLLMArguments

    model, tok = load_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    anllm_ext.patch(model, config.anchor_ids)
    ids = torch.tensor([tok.encode("One fact. Two facts. Three")])
    with pytest.raises(ValueError, match="anllm_recalled must be a bool tensor"):
        model(input_ids=ids, anllm_recalled=torch.ones_like(ids))
    with pytest.raises(ValueError, match="anllm_recalled must be a bool tensor"):
        model(input_ids=ids, anllm_recalled=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="anllm_recalled marks tokens of one pass"):
        model(input_ids=ids, cache=anllm_ext.AnchorCache(model.config),
              anllm_recalled=torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="recall_spans must be >= 0"):
        AnLLMArguments(data=["x"], recall_spans=-1)
    with pytest.raises(ValueError, match="--recall-spans extends the AnSAN mask"):
        AnLLMArguments(data=["x"], recall_spans=2, attention="causal")


@needs_smollm2
@pytest.mark.parametrize("objective", [{}, {"lora": True, "distill": True}], ids=["lm", "lora-distill"])
def test_train_with_recalled_spans(tmp_path, tiny_dir, corpus, objective):
    if objective:
        pytest.importorskip("peft")
    res = run_training(tmp_path, tiny_dir, corpus / "train", eval_data=[str(corpus / "eval.txt")], recall_spans=2,
                       max_steps=4, eval_before=False, **objective)
    assert res["objective"]["recall_spans"] == 2
    assert res["objective"]["loss"] == ("distill" if objective else "lm")
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(l == l for l in losses)
