"""anllm_ext.evaluation on tiny random Llama models: perplexity and multiple-choice scoring against
independent computations, cached == one masked pass, batched == one at a time, bad inputs."""
import json
import math

import pytest
import torch

import anllm_ext
from anllm_ext import evaluation as ev
from anllm_ext.config import AnchorConfig, resolve_anchor_config

from helpers import needs_datasets, ANCHOR, needs_smollm2, save_tiny_model, tiny_causal_lm, token_stream

VOCAB = 64


def EP(tok) -> AnchorConfig:
    """The EP anchors of `tok` (what `--anchors ep` resolves to)."""
    return resolve_anchor_config("ep", tok)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_causal_lm(vocab_size=VOCAB, pad_token_id=0)
    anllm_ext.patch(model, [ANCHOR])
    yield model
    anllm_ext.unpatch(model)


def _blocks(lengths, every=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids, _ = token_stream(1, n, "periodic", anchor_every=every, generator=g, vocab=VOCAB, low=2)
        out.append(ids[0].tolist())
    return out


def _nll_by_hand(model, block):
    """Mean over tokens 1.. of -log p(token | prefix): one unpadded forward, log-softmax by hand."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([block]), use_cache=False).logits[0].double()
    logz = torch.logsumexp(logits[:-1], dim=-1)
    picked = logits[:-1].gather(-1, torch.tensor(block[1:])[:, None]).squeeze(-1)
    return (logz - picked).sum().item(), len(block) - 1


def test_perplexity_matches_hand_computation(tiny):
    blocks = _blocks([40, 33, 17, 5])
    res = ev.perplexity(tiny, blocks, prefill_chunk=8, batch_size=3, progress=False)
    assert set(res.modes) == {"full", "ansan", "cached"}
    # full: the unpatched model, one block at a time; ansan: the patched model, one block at a time
    for mode in ("full", "ansan"):
        with ev.model_mode(tiny, mode):
            total = [_nll_by_hand(tiny, b) for b in blocks]
        nll = sum(t for t, _ in total) / sum(n for _, n in total)
        assert res[mode].tokens == sum(n for _, n in total) == 91
        assert res[mode].nll == pytest.approx(nll, abs=1e-5)
        assert res[mode].perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert anllm_ext.is_patched(tiny)  # the full mode restored the patch
    assert res["full"].nll != pytest.approx(res["ansan"].nll, abs=1e-4)  # the mask matters on this model


def test_perplexity_cached_equals_one_pass(tiny):
    blocks = _blocks([64, 50, 23])
    res = ev.perplexity(tiny, blocks, modes=("ansan", "cached"), prefill_chunk=9, batch_size=2, progress=False)
    assert res.max_abs_diff_cached_vs_ansan < 1e-4
    assert res["cached"].nll == pytest.approx(res["ansan"].nll, abs=1e-5)
    # KV kept = anchors + open segment per block, counted independently
    kept = sum(sum(1 for t in b if t == ANCHOR) + (len(b) - 1 - max(i for i, t in enumerate(b) if t == ANCHOR))
               for b in blocks)
    assert res["cached"].kv_kept_slots == kept
    assert res["cached"].kv_full_slots == sum(len(b) for b in blocks)
    assert res["cached"].c_down == pytest.approx(1 - kept / sum(len(b) for b in blocks))
    # peak: per block, the most slots held at once = kept before a chunk + the chunk, simulated by hand
    def kept_after(b, e):
        anchors = [i for i, t in enumerate(b[:e]) if t == ANCHOR]
        return len(anchors) + (e - 1 - anchors[-1] if anchors else e)

    peak = sum(max((kept_after(b, s) if s else 0) + min(9, len(b) - s) for s in range(0, len(b), 9)) for b in blocks)
    assert res["cached"].kv_peak == pytest.approx(peak / sum(len(b) for b in blocks))
    assert res["cached"].kv_kept < res["cached"].kv_peak < 1.0


def test_recall_mode_scores_against_a_recalling_anchor_cache(tiny):
    """`cached+recall`: each block prefilled into an AnchorCache with the RecallConfig given, scored token by token
    as that cache computes it (by hand here); recall changes the scores and its hot KV counts the recalled slots."""
    from anllm_ext import AnchorCache, RecallConfig, prefill

    blocks = _blocks([60, 45], every=5)
    recall = RecallConfig(budget=2, score="peak")
    res = ev.perplexity(tiny, blocks, modes=("cached", "cached+recall"), prefill_chunk=8, batch_size=1,
                        progress=False, recall=recall)
    nll, n = 0.0, 0
    for b in blocks:
        ids = torch.tensor([b])
        _, logits = prefill(tiny, ids, cache=AnchorCache(tiny.config, recall=recall), prefill_chunk=8,
                            return_logits=True)
        lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])
        nll, n = nll - float(lp.double().sum()), n + len(b) - 1
    assert res["cached+recall"].perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["cached+recall"].nll != pytest.approx(res["cached"].nll, abs=1e-4)
    assert res["cached"].kv_kept < res["cached+recall"].kv_kept < 1.0


def test_recent_mode_scores_against_an_anchor_cache_keeping_recent_sentences(tiny):
    """`cached+recent`: each block prefilled into an AnchorCache(recent=N), scored as that cache computes it (by hand
    here); the recent sentences change the scores and count in the KV kept."""
    from anllm_ext import AnchorCache, prefill

    blocks = _blocks([60, 45], every=5)
    res = ev.perplexity(tiny, blocks, modes=("cached", "cached+recent"), prefill_chunk=8, batch_size=2,
                        progress=False, recent=2)
    nll, n, kept = 0.0, 0, 0
    for b in blocks:
        ids = torch.tensor([b])
        cache, logits = prefill(tiny, ids, cache=AnchorCache(tiny.config, recent=2), prefill_chunk=8,
                                return_logits=True)
        lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])
        nll, n, kept = nll - float(lp.double().sum()), n + len(b) - 1, kept + cache.lengths()[0]
    assert res["cached+recent"].perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["cached+recent"].nll != pytest.approx(res["cached"].nll, abs=1e-4)
    assert res["cached+recent"].kv_kept_slots == kept > res["cached"].kv_kept_slots
    with pytest.raises(ValueError, match="recent must be an integer >= 1"):
        ev.perplexity(tiny, blocks, modes=("cached+recent",), recent=0, progress=False)


def test_perplexity_batched_equals_single(tiny):
    blocks = _blocks([30, 12, 25, 7, 19])
    one = ev.perplexity(tiny, blocks, batch_size=1, prefill_chunk=5, progress=False)
    many = ev.perplexity(tiny, blocks, batch_size=4, prefill_chunk=5, progress=False)
    for mode in ev.MODES:
        assert many[mode].nll == pytest.approx(one[mode].nll, abs=1e-5)
    d = many.to_dict()
    assert json.loads(many.to_json())["modes"]["cached"]["c_down"] == pytest.approx(d["modes"]["cached"]["c_down"])
    assert "cached" in many.table() and "C-down" in many.table()


def test_perplexity_bad_inputs(tiny):
    with pytest.raises(ValueError, match="block 1 has 1 tokens"):
        ev.perplexity(tiny, [[3, 4, 5], [3]], progress=False)
    with pytest.raises(ValueError, match="unknown evaluation mode 'fast'"):
        ev.perplexity(tiny, [[3, 4, 5]], modes=("fast",), progress=False)
    with pytest.raises(ValueError, match="no blocks"):
        ev.perplexity(tiny, [], progress=False)
    anllm_ext.unpatch(tiny)
    try:
        with pytest.raises(ValueError, match="carries no anchor configuration"):
            ev.perplexity(tiny, [[3, 4, 5]], modes=("ansan",), progress=False)
        # anchor_ids= patches for the call only
        res = ev.perplexity(tiny, [[3, 1, 4, 5]], modes=("ansan",), anchor_ids=[ANCHOR], progress=False)
        assert res["ansan"].tokens == 3 and not anllm_ext.is_patched(tiny)
    finally:
        anllm_ext.patch(tiny, [ANCHOR])


# ------------------------------------------------------------------------------------ continuation scoring


def _requests():
    b = _blocks([30, 12], every=5, seed=3)
    return [(b[0][:20], [5, 6, 7]), (b[0][:20], [9]), (b[1], [3, 4]), (b[0][:20], [11, 12, 13, 14]),
            (b[1], [1, 8]), (b[0][:7], [2])]


def _continuation_by_hand(model, ctx, cont):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logp[p, t].item() for p, t in zip(pos, cont)), all(logits[p].argmax().item() == t for p, t in zip(pos, cont))


@pytest.mark.parametrize("mode", ev.MODES)
def test_scores_match_hand_computation_and_batching(tiny, mode):
    reqs = _requests()
    with ev.model_mode(tiny, mode):
        by_hand = [_continuation_by_hand(tiny, list(c), list(o)) for c, o in reqs]
        one = ev.score_continuations(tiny, reqs, mode, batch_size=1, prefill_chunk=6)
        many = ev.score_continuations(tiny, reqs, mode, batch_size=5, prefill_chunk=6)
    ref_mode = "ansan" if mode == "cached" else mode
    if ref_mode != mode:  # the cached scores are checked against one masked pass of the whole sequence
        with ev.model_mode(tiny, ref_mode):
            by_hand = [_continuation_by_hand(tiny, list(c), list(o)) for c, o in reqs]
    for (lp, greedy), a, b, ga in zip(by_hand, one.logprobs, many.logprobs, one.greedy):
        assert a == pytest.approx(lp, abs=1e-4)
        assert b == pytest.approx(a, abs=1e-5)
        assert ga == greedy
    if mode == "cached":  # three distinct contexts, each prefilled once and compacted
        ctxs = {tuple(c) for c, _ in reqs}
        assert one.kv_full_slots == sum(len(c) for c in ctxs)
        assert one.kv_kept_slots < one.kv_full_slots


# ------------------------------------------------------------------------------------ multiple choice

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Nice", "Lille"], "answer": 0},
    {"question": "What is the capital of Italy?", "choices": ["Milan", "Rome", "Turin", "Naples"], "answer": 1},
    {"question": "What is the capital of Spain?", "choices": ["Seville", "Valencia", "Madrid", "Bilbao"], "answer": 2},
    {"question": "What is the capital of Peru?", "choices": ["Cusco", "Lima", "Arequipa"], "answer": 1},
    {"question": "What is the capital of Japan?", "choices": ["Osaka", "Kyoto", "Tokyo", "Nagoya"], "answer": 2},
    {"question": "What is the capital of Kenya?", "choices": ["Nairobi", "Mombasa", "Kisumu", "Nakuru"], "answer": 0},
]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from anllm_ext.models import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_vocab(tokenizer):
    """A tiny random Llama over the SmolLM2 vocabulary, patched with the EP anchors of that vocabulary."""
    from anllm_ext.anchors import ep_anchor_ids

    model = tiny_causal_lm(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    anllm_ext.patch(model, ep_anchor_ids(tokenizer))
    yield model
    anllm_ext.unpatch(model)


def test_load_multiple_choice_and_bad_rows(tmp_path):
    qs = ev.load_multiple_choice(_write_jsonl(tmp_path / "ok.jsonl", QUESTIONS[:2] + [""] + QUESTIONS[2:3]))
    assert [q.answer for q in qs] == [0, 1, 2] and qs[2].row.endswith("ok.jsonl:4")
    bad = [
        ('{"question": "Q?", "choices": ["a", "b"], "answer": 0', "bad.jsonl:2: malformed JSON"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "bad.jsonl:2: answer index 2 is out of range for 2"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": -1}, "bad.jsonl:2: answer index -1 is out of range"),
        ({"question": "Q?", "choices": ["a", "b"]}, r"bad.jsonl:2: missing key\(s\) \['answer'\]"),
        ({"question": "Q?", "choices": ["a"], "answer": 0}, "bad.jsonl:2: 'choices' must be a list of at least 2"),
        ({"question": "Q?", "choices": ["a", "a"], "answer": 0}, "bad.jsonl:2: choices repeat"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, "bad.jsonl:2: 'question' must be a non-empty"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": "0"}, "bad.jsonl:2: 'answer' must be an integer"),
        ("[1, 2]", "bad.jsonl:2: expected a JSON object"),
    ]
    for row, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ev.load_multiple_choice(_write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], row]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_multiple_choice(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds no questions"):
        ev.load_multiple_choice(_write_jsonl(tmp_path / "empty.jsonl", [""]))


def _questions():
    return [ev.Question(q["question"], q["choices"], q["answer"], f"q:{i}") for i, q in enumerate(QUESTIONS)]


def test_fewshot_prompts():
    qs = _questions()
    cfg = ev.MultipleChoiceConfig(shots=3, seed=7, demo_end="ac")
    ctx = ev.build_context(qs, 2, cfg)
    assert ctx == ev.build_context(qs, 2, cfg)  # seeded
    parts = ctx.split("\n\n")
    assert len(parts) == 4 and parts[-1] == "Question: What is the capital of Spain?\nAnswer:"
    assert all(p.endswith("<AC>") for p in parts[:3]) and "Spain" not in "".join(parts[:3])  # never itself
    ep = ev.build_context(qs, 2, ev.MultipleChoiceConfig(shots=3, seed=7, demo_end="period")).split("\n\n")
    assert all(p.endswith(".") and not p.endswith("..") for p in ep[:3])
    assert ev.build_context(qs, 2, ev.MultipleChoiceConfig(shots=0)) == parts[-1]
    with pytest.raises(ValueError, match="6 shots need at least 7 questions"):
        ev.build_context(qs, 0, ev.MultipleChoiceConfig(shots=6))
    with pytest.raises(ValueError, match="demo_end must be one of"):
        ev.MultipleChoiceConfig(demo_end="comma")


@needs_smollm2
def test_multiple_choice_scores_by_hand(tokenizer, tiny_vocab):
    qs = _questions()
    cfg = ev.MultipleChoiceConfig(shots=2, demo_end="period", modes=("full", "ansan", "cached"), batch_size=5,
                                  prefill_chunk=7, progress=False)
    res = ev.multiple_choice(tiny_vocab, tokenizer, qs, cfg)
    # the log-likelihood of every option, computed by hand from one unpadded forward of the whole text
    for mode, ref_mode in (("full", "full"), ("ansan", "ansan"), ("cached", "ansan")):
        with ev.model_mode(tiny_vocab, ref_mode):
            for qi, q in enumerate(qs):
                ctx = tokenizer(ev.build_context(qs, qi, cfg))["input_ids"]
                for ci, c in enumerate(q.choices):
                    cont = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                    lp, _ = _continuation_by_hand(tiny_vocab, ctx, cont)
                    assert res.scores[mode][qi][ci] == pytest.approx(lp, abs=1e-4), (mode, qi, ci)
        s = res.scores[mode]
        acc = sum(max(range(len(x)), key=x.__getitem__) == q.answer for x, q in zip(s, qs)) / len(qs)
        norm = sum(max(range(len(x)), key=lambda c: x[c] / len(q.choices[c])) == q.answer for x, q in zip(s, qs)) / len(qs)
        assert res[mode].accuracy == acc and res[mode].accuracy_norm == norm
    assert res.max_abs_diff_cached_vs_ansan < 1e-4
    assert res["cached"].accuracy == res["ansan"].accuracy
    # two demonstrations end with an EP anchor each: the cache drops them down to anchors
    assert res["cached"].kv_kept < 0.6 and res["full"].kv_kept == 1.0
    one = ev.multiple_choice(tiny_vocab, tokenizer, qs, ev.MultipleChoiceConfig(
        shots=2, demo_end="period", batch_size=1, prefill_chunk=7, progress=False))
    for mode in ev.MODES:  # batch 1 (one option per forward) gives the same scores
        for a, b in zip(one.scores[mode], res.scores[mode]):
            assert a == pytest.approx(b, abs=1e-5)
    d = json.loads(res.to_json(with_scores=True))
    assert d["modes"]["cached"]["accuracy"] == res["cached"].accuracy and len(d["scores"]["full"]) == len(qs)
    assert "accuracy_norm" in res.table()


# ------------------------------------------------------------------------------------ CLI and SmolLM2


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_eval"), tokenizer, bos_token_id=1, eos_token_id=2)


@needs_smollm2
@needs_datasets
def test_cli_eval(tiny_dir, tmp_path, capsys):
    from anllm_ext import cli

    mc = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    text = tmp_path / "t.txt"
    text.write_text("The sun rose. Birds sang in the trees. The day began slowly. " * 6, encoding="utf-8")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--text", str(text), "--shots", "0", "2",
                   "--limit", "4", "--block-size", "40", "--max-blocks", "2", "--prefill-chunk", "8", "--batch-size", "5",
                   "--no-progress", "--json", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for key in ("perplexity", "accuracy", "C-down", "T-up", "2-shot", "demonstrations end: period"):
        assert key in printed
    d = json.loads(out.read_text())
    assert [r["task"] for r in d["results"]] == ["perplexity", "multiple_choice", "multiple_choice"]
    assert d["results"][2]["config"]["shots"] == 2 and d["results"][2]["questions"] == 4
    assert d["results"][2]["max_abs_diff_cached_vs_ansan"] < 1e-4
    assert png.stat().st_size > 1000
    # bad inputs: nothing to evaluate, a bad row, more shots than questions
    assert cli.main(["eval", "--model", tiny_dir, "--no-progress"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], {"question": "Q?", "choices": ["a", "b"], "answer": 5}])
    assert cli.main(["eval", "--model", tiny_dir, "--mc", str(bad), "--no-progress"]) == 2
    assert "bad.jsonl:2: answer index 5 is out of range" in capsys.readouterr().err
    assert cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--shots", "6", "--no-progress"]) == 2
    assert "6 shots need at least 7 questions" in capsys.readouterr().err
    assert cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--mode", "full,fast", "--no-progress"]) == 2
    assert "unknown evaluation mode 'fast'" in capsys.readouterr().err



def test_cli_eval_recall_mode(tiny_dir, tmp_path, capsys):
    from anllm_ext import cli

    mc, out = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "r.json"
    rc = cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--shots", "2", "--limit", "3", "--prefill-chunk", "8",
                   "--mode", "cached,cached+recall", "--recall-budget", "1", "--recall-score", "peak", "--no-progress",
                   "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    (res,) = json.loads(out.read_text())["results"]
    assert res["config"]["recall"]["budget"] == 1 and res["config"]["recall"]["score"] == "peak"
    assert set(res["modes"]) == {"cached", "cached+recall"}
    with pytest.raises(SystemExit):  # argparse names the option
        cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--recall-budget", "0", "--no-progress"])
    assert "--recall-budget: must be an integer >= 1" in capsys.readouterr().err


def test_cli_eval_recent_mode(tiny_dir, tmp_path, capsys):
    from anllm_ext import cli

    mc, out = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS), tmp_path / "r.json"
    rc = cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--shots", "2", "--limit", "3", "--prefill-chunk", "8",
                   "--mode", "cached,cached+recent", "--recent", "1", "--no-progress", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    (res,) = json.loads(out.read_text())["results"]
    assert res["config"]["recent"] == 1 and set(res["modes"]) == {"cached", "cached+recent"}
    assert res["modes"]["cached+recent"]["kv_kept"] > res["modes"]["cached"]["kv_kept"]
    with pytest.raises(SystemExit):  # argparse names the option
        cli.main(["eval", "--model", tiny_dir, "--mc", str(mc), "--recent", "0", "--no-progress"])
    assert "--recent: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("spec, demo_end", [("ep", "period"), ("ac", "ac"), ("13,30", "none")])
def test_run_eval_takes_the_anchors_it_is_given(tiny_dir, spec, demo_end):
    """One way through `anllm eval`: the caller's AnchorConfig decides how the text is cut, what ends a
    demonstration and the patch of each mode; the model is left as it was."""
    from anllm_ext.models import load_model

    model, tok = load_model(tiny_dir)
    anchors = resolve_anchor_config(spec, tok, model)
    text = "The sun rose. Birds sang in the trees. The day began slowly. " * 4
    plan = ev.EvalPlan(texts=[text], questions=_questions(), shots=[2], limit=3, block_size=40, max_blocks=2,
                       prefill_chunk=8, progress=False)
    ppl, mc = ev.run_eval(model, tok, anchors, plan)
    assert not anllm_ext.is_patched(model)
    assert mc.config.demo_end == demo_end and mc.config.ac_token == (anchors.ac_token or anllm_ext.AC_TOKEN)
    assert ppl["cached"].kv_kept < 1.0 if spec != "13,30" else ppl["cached"].kv_kept <= 1.0
    expected = ev.text_blocks(tok, [text], anchors, 40, 2)
    assert ppl.blocks == len(expected)
    # the same tasks by hand, patched once with the same anchors, give the same figures
    anllm_ext.patch(model, anchors)
    by_hand = ev.perplexity(model, expected, modes=plan.modes, prefill_chunk=8, progress=False)
    for mode in plan.modes:
        assert by_hand[mode].perplexity == pytest.approx(ppl[mode].perplexity, rel=1e-6)


def test_eval_plan_refuses_bad_settings():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ev.EvalPlan()
    with pytest.raises(ValueError, match="demo_end"):
        ev.EvalPlan(texts=["x"], demo_end="comma")
    with pytest.raises(ValueError, match="unknown evaluation mode"):
        ev.EvalPlan(texts=["x"], modes=("full", "fast"))
    with pytest.raises(ValueError, match="shots"):
        ev.EvalPlan(texts=["x"], shots=[-1])


@pytest.fixture(scope="module")
def smollm2():
    from anllm_ext.anchors import ep_anchor_ids
    from anllm_ext.models import load_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model()
    anllm_ext.patch(model, ep_anchor_ids(tok))
    yield model, tok
    anllm_ext.unpatch(model)


@needs_smollm2
def test_smollm2_cached_equals_one_pass(smollm2):
    from anllm_ext.sample_text import sample_text

    model, tok = smollm2
    qs = _questions()
    cfg = ev.MultipleChoiceConfig(shots=3, demo_end="period", modes=("ansan", "cached"), batch_size=8,
                                  prefill_chunk=16, limit=3, progress=False)
    res = ev.multiple_choice(model, tok, qs, cfg)
    assert res.max_abs_diff_cached_vs_ansan < 2e-3  # fp32 log-likelihoods of O(10)
    assert res["cached"].accuracy == res["ansan"].accuracy
    assert res["cached"].kv_kept < 0.5  # three demonstrations closed by periods, dropped to their anchors
    blocks = ev.text_blocks(tok, [sample_text(4000)], EP(tok), block_size=96, max_blocks=2)
    ppl = ev.perplexity(model, blocks, modes=("ansan", "cached"), prefill_chunk=32, progress=False)
    assert ppl.max_abs_diff_cached_vs_ansan < 2e-3
    assert ppl["cached"].perplexity == pytest.approx(ppl["ansan"].perplexity, rel=1e-4)
    assert ppl["cached"].kv_kept < ppl["cached"].kv_peak < 1.0


@needs_smollm2
def test_text_blocks_follow_the_training_data_rules(smollm2):
    """text_blocks (the API and `anllm eval --text`) cuts text as `anllm train` cuts its held-out text: BOS
    first (when the tokenizer adds one), at most block_size tokens, cut after an anchor unless one segment fills a whole block, and
    nothing lost or reordered."""
    from anllm_ext.anchors import ep_anchor_ids
    from anllm_ext.data import _adds_bos
    from anllm_ext.sample_text import sample_text

    _, tok = smollm2
    bos = [tok.bos_token_id] if _adds_bos(tok) else []
    anchors = set(ep_anchor_ids(tok))
    text = sample_text(6000)
    blocks = ev.text_blocks(tok, [text], EP(tok), block_size=64)
    assert all(b[: len(bos)] == bos and len(b) <= 64 for b in blocks)
    assert all(b[-1] in anchors or len(b) == 64 for b in blocks[:-1])
    assert sum(b[-1] in anchors for b in blocks[:-1]) > len(blocks) // 2
    assert [t for b in blocks for t in b[len(bos):]] == tok(text, add_special_tokens=False)["input_ids"]
    assert ev.text_blocks(tok, [text], EP(tok), block_size=64, max_blocks=3) == blocks[:3]
    with pytest.raises(ValueError, match="no token"):
        ev.text_blocks(tok, [text], AnchorConfig("ac", [0], ac_token="<not-a-token>"))
    with pytest.raises(TypeError, match="AnchorConfig"):
        ev.text_blocks(tok, [text], ep_anchor_ids(tok))
