"""The attention sink served by vLLM: a model whose anchor configuration has ``sink`` = S (here the bundled AnLLM
exported with ``--sink 1``) has the first S tokens of every request as anchors, as ``anllm_ext.patch`` gives it
with transformers. Prompts submitted together (continuous batching, chunked prefill; a few wait for a free
sequence) generate anllm_ext.generate's greedy tokens with the sink, with and without recent sentences kept
hot, and some differ from the tokens without the sink (else the comparison would prove nothing); after every
step each request holds exactly the blocks of its kept slots under the sink rule; with prefix caching a later
request reuses the anchor blocks of a shared system prompt as the sink rule cuts them. The setting comes with
the model (its anchor configuration) and reaches the engine's kept-slot rule.

The engines run in a process of their own (engine_probe.py) with 32-slot blocks."""
import json

import pytest

from anllm_ext.config import AnchorConfig
from anllm_ext.vllm.compaction import KeepRule
from anllm_ext.vllm.detect import keep_rule
from engine_probe import probe
from vllm_helpers import assert_holds_its_kept_blocks, blocks_for, engine_config, expected_cached, reference, sentences

SINK = 1
MAX_NEW = 8
B = 32
# 3 sequences at once: the fourth prompt waits until a short one is done, by when the first one's system prompt
# is computed and its anchor blocks cached
ENGINE = dict(block_size=B, max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=3, num_gpu_blocks_override=64)
SHORT = [1, 2, 4]  # the prompts compared with the tokens without the sink (a reference costs a generate per prompt)


@pytest.fixture(scope="module")
def prompts_for(tokenizer):
    """``prompts_for(rule_without_sink)``: a system prompt of 36 short sentences (more than a block of anchors,
    prefilled in chunks) with two tails (first and fourth), a count cut where ``rule_without_sink`` keeps
    exactly one block of slots (so the sink token needs a second one) and two two-sentence prompts."""
    sents = sentences()
    system = tokenizer(" ".join(sorted(sents, key=len)[:36]))["input_ids"]
    tail_a, tail_b = (tokenizer(" " + " ".join(sents[s: s + 2]))["input_ids"] for s in (0, 90))
    two_a, two_b = (tokenizer(" ".join(sents[s: s + 2]))["input_ids"] for s in (120, 200))
    count = tokenizer("We count. We count again. Here it goes. " + ", ".join(map(str, range(1, 60))))["input_ids"]

    def make(rule_without_sink):
        n = next(n for n in range(len(count)) if rule_without_sink.num_kept(count[:n]) == B)
        return [system + tail_a, count[:n], two_a, system + tail_b, two_b]

    return make


def test_sink_comes_with_the_models_anchor_configuration(anllm_dir, anllm_sink_dir, plain_dir):
    """The export writes it into config.json's "anllm" key; the engine's kept-slot rule takes it from there (or
    from ``hf_overrides``), with the engine's ``anllm_recent``; a bad one fails at engine start."""
    assert json.loads((anllm_sink_dir / "config.json").read_text())["anllm"]["sink"] == SINK
    assert "sink" not in json.loads((anllm_dir / "config.json").read_text())["anllm"]
    rule = keep_rule(engine_config(anllm_sink_dir, enable_prefix_caching=False, additional_config={"anllm_recent": 2}))
    assert (rule.sink, rule.recent) == (SINK, 2)
    assert rule.anchor_ids.tolist() == AnchorConfig.find_pretrained(anllm_dir).anchor_ids
    assert keep_rule(engine_config(anllm_dir)).sink == 0
    assert keep_rule(engine_config(plain_dir)) is None
    anchors = AnchorConfig.find_pretrained(anllm_dir).to_dict()
    assert keep_rule(engine_config(plain_dir, hf_overrides={"anllm": {**anchors, "sink": 3}})).sink == 3
    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        engine_config(plain_dir, hf_overrides={"anllm": {**anchors, "sink": -1}})


def test_export_refuses_a_bad_sink_before_merging(tmp_path):
    from anllm_ext.vllm.export import export_merged, main

    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        export_merged("smollm2-anllm", tmp_path / "out", sink=-1)
    with pytest.raises(SystemExit):
        main(["smollm2-anllm", str(tmp_path / "out"), "--sink", "-1"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recent", [0, 2])
def test_sink_generates_anchor_caches_tokens_and_holds_its_kept_slots(anllm_dir, anllm_sink_dir, prompts_for,
                                                                     anchor_ids, recent):
    rule, without_sink = KeepRule(anchor_ids, recent, SINK), KeepRule(anchor_ids, recent)
    prompt_ids = prompts_for(without_sink)
    caching = recent == 0  # prefix caching is refused with recent sentences
    report = probe(anllm_sink_dir, prompt_ids, MAX_NEW, enable_prefix_caching=caching,
                   additional_config={"anllm_recent": recent}, **ENGINE)
    assert report["scheduler"] == "AnchorScheduler" and report["block_size"] == B
    assert max(s["running"] for s in report["steps"]) == ENGINE["max_num_seqs"]  # batched beside prefill chunks
    assert max(len(p) for p in prompt_ids) > 2 * ENGINE["max_num_batched_tokens"]  # chunked prefill

    expected = reference(anllm_sink_dir, prompt_ids, anchors=True, max_new=MAX_NEW, recent=recent)
    for i, (got, (want, _)) in enumerate(zip(report["outputs"], expected)):
        assert got == want, f"prompt {i} ({len(prompt_ids[i])} tokens): vLLM {got} != anllm_ext.generate {want}"
    no_sink = reference(anllm_dir, [prompt_ids[i] for i in SHORT], anchors=True, max_new=MAX_NEW, recent=recent)
    assert any(n != expected[i][0] for i, (n, _) in zip(SHORT, no_sink)), "the sink changed no token: it proves nothing"

    states = assert_holds_its_kept_blocks(report, prompt_ids, rule)
    # the sink token held a block that the rule without it would have freed (the count, once prefilled)
    assert any(blocks != blocks_for(without_sink, tokens, B) for tokens, blocks in states)

    reused = expected_cached(prompt_ids[0], prompt_ids[3], rule, B) if caching else 0
    assert report["cached"] == [0, 0, 0, reused, 0], report["cached"]
    if caching:  # the reused anchor blocks are cut by the sink rule: the sink token is the first block's first anchor
        assert reused > 0 and reused != expected_cached(prompt_ids[0], prompt_ids[3], without_sink, B)
