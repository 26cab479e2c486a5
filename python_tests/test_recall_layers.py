"""Finding a model's recall layers (anllm_ext/evaluation/recall_layers.py, `anllm recall-layers`): the fact trials,
bad input, and the bundled AnLLM end to end (each layer's hit is what its own recall choice held)."""
import json

import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache, RecallConfig
from anllm_ext.evaluation.recall_layers import fact_segment, fact_trials, find_recall_layers, text_paragraphs
from anllm_ext.sample_text import sample_text

from helpers import needs_datasets, needs_smollm2, tiny_model

PARAGRAPHS = text_paragraphs([sample_text(30000)])


def test_fact_trials_are_seeded_and_checked():
    a = fact_trials([256, 512], [0.2, 0.8], 2, 10, seed=3)
    assert a == fact_trials([256, 512], [0.2, 0.8], 2, 10, seed=3) and len(a) == 8
    assert a[0].needle.startswith("The ") and a[0].needle.endswith(f" office is {a[0].code}.")
    assert a[0].name in a[0].question and a[0].attribute in a[0].question
    with pytest.raises(ValueError, match="fractions in"):
        fact_trials([256], [1.5], 1, 10)
    with pytest.raises(ValueError, match="per_cell >= 1"):
        fact_trials([256], [0.5], 0, 10)


def test_find_recall_layers_rejects_bad_input():
    with pytest.raises(ValueError, match="needs a patched model"):
        find_recall_layers(tiny_model("llama"), None, PARAGRAPHS)
    with pytest.raises(ValueError, match="min_hit is a share"):
        find_recall_layers(anllm_ext.patch(tiny_model("llama"), 13), None, PARAGRAPHS, min_hit=0.0)


@needs_smollm2
def test_recall_layers_of_the_bundled_anllm():
    """Each layer's hit rate is whether its own choice (pool="layer") held the fact's sentence, checked here
    against an independent run of the same prompt through anllm_ext.generate's chunked prefill; the layers
    returned are exactly those at or over min_hit."""
    from anllm_ext.evaluation.needle import chat_ids, haystack_text
    from anllm_ext.models import load_model

    model, tok = load_model("smollm2-anllm")
    anllm_ext.patch(model)
    found = find_recall_layers(model, tok, PARAGRAPHS, lengths=(320,), depths=(0.4,), min_hit=1.0, seed=5)
    assert found.trials == 1 and len(found.hit_rate) == len(model.model.layers)
    assert found.layers == [l for l, r in enumerate(found.hit_rate) if r == 1.0] and found.layers
    (trial,) = fact_trials((320,), (0.4,), 1, len(PARAGRAPHS), seed=5)
    haystack = haystack_text(tok, PARAGRAPHS, trial)
    ids, head = chat_ids(tok, haystack + trial.question), chat_ids(tok, haystack)
    split = next(i for i in range(ids.shape[1]) if ids[0, i] != head[0, i])
    cache = AnchorCache(model.config, recall=RecallConfig(every="prompt", index="tokens", score="peak"))
    with torch.no_grad():
        anllm_ext.prefill(model, ids[:, :split], cache=cache, prefill_chunk=4096)
        anllm_ext.prefill(model, ids[:, split:], cache=cache, prefill_chunk=4096)
    segment = fact_segment(tok, model, ids, trial)
    held = [float((cache.recall.chosen[l][0] == segment).any()) for l in range(len(model.model.layers))]
    assert held == found.hit_rate
    with pytest.raises(ValueError, match="is not in the prompt"):
        fact_segment(tok, model, chat_ids(tok, trial.question), trial)


@needs_smollm2
@needs_datasets
def test_cli_recall_layers(tmp_path, capsys):
    from anllm_ext.cli import main

    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(PARAGRAPHS))
    out = tmp_path / "layers.json"
    assert main(["recall-layers", "--text", str(text), "--lengths", "256", "--depths", "0.5", "--min-hit", "1",
                 "--json", str(out), "--threads", "2", "--no-progress"]) == 0
    got = json.loads(out.read_text())
    assert len(got["hit_rate"]) == 30 and got["layers"] and got["index"] == "tokens"
    printed = capsys.readouterr().out
    assert f"--recall-layers {' '.join(map(str, got['layers']))}" in printed
    assert main(["recall-layers", "--text", str(tmp_path / "missing.txt")]) == 2
