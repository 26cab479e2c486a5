"""`anllm generate` on a tiny local model directory (fast) and argument errors."""

import re

import pytest
import torch

import anllm_ext
from anllm_ext import cli, side_by_side
from anllm_ext.layout import token_layout

from helpers import kept_slots, needs_smollm2, save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from anllm_ext.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), tok, bos_token_id=1, eos_token_id=2)


PROMPT = "The sun rose. Birds sang. The day began"
N_NEW = 5


def parse_report(out):
    """{row label: [full cache, anchor cache]} from the table, the generated text and the summary lines."""
    table = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 3 and cells[0] in ("KV slots kept", "KV bytes", "peak KV bytes", "prefill tokens/s",
                                            "decode tokens/s"):
            table[cells[0]] = cells[1:]
    text = generated_text(out, "anchor cache")
    return table, text


def generated_text(out, label):
    """The text the report prints under ``--- generated (<label>) ---`` (None when there is no such section)."""
    head = f"--- generated ({label}) ---\n"
    if head not in out:
        return None
    return out.split(head, 1)[1].split("\n" + "-" * 32 + "\n", 1)[0]


def expected_runs(model_dir, anchors_spec):
    """The two runs the CLI reports, recomputed here: the unpatched model with a DynamicCache, and the
    tokens the anchor cache must keep, from the layout of the tokens it saw (anchors + open segment)."""
    from anllm_ext.anchors import decode
    from anllm_ext.config import resolve_anchors
    from anllm_ext.models import load_model

    model, tok = load_model(model_dir)
    anchors = resolve_anchors(anchors_spec, tok, model)
    args = cli.build_parser().parse_args(["generate", "--prompt", PROMPT, "--anchors", anchors_spec])
    ids = cli._load_prompt(args, tok)
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.eos_token_id)
    anchor = anllm_ext.generate(model, ids, prefill_chunk=4, max_new_tokens=N_NEW, anchor_ids=anchors,
                                eos_token_id=None)
    seen = token_layout(anchor[:, :-1], anchors)  # the last generated token is never fed back
    kept = int(kept_slots(seen).sum())
    cfg = model.config
    slot_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    text = decode(tok, anchor[0, ids.shape[1]:], anchor_ids=anchors, skip_special_tokens=True)
    full_text = decode(tok, full[0, ids.shape[1]:], anchor_ids=anchors, skip_special_tokens=True)
    return dict(n_prompt=ids.shape[1], full=full, anchor=anchor, kept=kept, slot_bytes=slot_bytes, text=text,
                full_text=full_text)


@needs_smollm2
@pytest.mark.parametrize("anchors", ["ep", "ac", "13,30"])
def test_cli_generate_on_local_dir(tiny_model_dir, capsys, anchors):
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--max-new-tokens", str(N_NEW),
                   "--prefill-chunk", "4", "--no-progress", "--ignore-eos", "--anchors", anchors])
    out = capsys.readouterr().out
    assert rc == 0, out
    table, text = parse_report(out)
    exp = expected_runs(tiny_model_dir, anchors)
    n_full = exp["n_prompt"] + N_NEW - 1
    assert f"prompt: {exp['n_prompt']} tokens" in out
    assert table["KV slots kept"] == [str(n_full), str(exp["kept"])]
    assert exp["kept"] < n_full  # the prompt's closed segments were dropped
    assert table["KV bytes"] == [side_by_side._human(n_full * exp["slot_bytes"]), side_by_side._human(exp["kept"] * exp["slot_bytes"])]
    assert table["peak KV bytes"][0] == side_by_side._human(n_full * exp["slot_bytes"])
    for row in ("prefill tokens/s", "decode tokens/s"):
        assert all(float(x) > 0 for x in table[row]), table[row]
    assert text.strip() == exp["text"].strip()
    reduction = 100 * (1 - exp["kept"] / n_full)
    assert f"KV reduction (C-down) against the full cache: {reduction:.1f}% at the end" in out
    same = torch.equal(exp["full"], exp["anchor"])
    assert f"same tokens as the full cache: {'yes' if same else 'no'}" in out


@needs_smollm2
def test_cli_generate_prints_both_texts(tiny_model_dir, capsys):
    """Both runs' generated texts are printed, labelled, full cache first, exactly as decoded (blank lines kept);
    the summary says where the two runs' tokens part; --anchor-only prints the anchor cache's text only."""
    argv = ["generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--max-new-tokens", str(N_NEW),
            "--prefill-chunk", "4", "--no-progress", "--ignore-eos", "--anchors", "ep"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    exp = expected_runs(tiny_model_dir, "ep")
    assert out.index("--- generated (full cache) ---") < out.index("--- generated (anchor cache) ---")
    assert generated_text(out, "full cache") == exp["full_text"]
    assert generated_text(out, "anchor cache") == exp["text"]
    n = exp["n_prompt"]
    full_new, anchor_new = exp["full"][0, n:].tolist(), exp["anchor"][0, n:].tolist()
    if full_new == anchor_new:
        assert "same tokens as the full cache: yes\n" in out
    else:
        first = next(i for i, (a, b) in enumerate(zip(full_new, anchor_new)) if a != b)
        assert f"same tokens as the full cache: no (they part at generated token {first + 1})" in out

    assert cli.main(argv + ["--anchor-only"]) == 0
    out = capsys.readouterr().out
    assert generated_text(out, "full cache") is None
    assert generated_text(out, "anchor cache") == exp["text"]
    assert "same tokens as the full cache" not in out


def test_cli_generate_with_recent_sentences(tiny_model_dir, capsys):
    """--recent N: a run of the anchor cache keeping N closed sentences hot, whose tokens are what anllm_ext.generate
    gives with AnchorCache(recent=N) and whose kept slots are that cache's."""
    from anllm_ext import AnchorCache
    from anllm_ext.anchors import decode
    from anllm_ext.config import resolve_anchors
    from anllm_ext.models import load_model

    prompt = " ".join([PROMPT + "."] * 4)
    argv = ["generate", "--model", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", str(N_NEW),
            "--prefill-chunk", "4", "--no-progress", "--ignore-eos", "--anchors", "ep", "--recent", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    model, tok = load_model(tiny_model_dir)
    anchors = resolve_anchors("ep", tok, model)
    ids = cli._load_prompt(cli.build_parser().parse_args(argv), tok)
    cache = AnchorCache(model.config, recent=2)
    want = anllm_ext.generate(model, ids, torch.ones_like(ids), prefill_chunk=4, anchor_ids=anchors, cache=cache,
                              max_new_tokens=N_NEW, eos_token_id=None, do_sample=False)
    assert generated_text(out, "anchor cache + recent 2") == decode(tok, want[0, ids.shape[1]:], anchor_ids=anchors,
                                                                     skip_special_tokens=True)
    row = re.search(r"KV slots kept\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert int(row.group(2)) < int(row.group(3)) == sum(cache.stats()["kept_slots"])
    assert "anchor cache + recent 2: decode speed-up (T-up)" in out
    with pytest.raises(SystemExit):  # argparse names the option
        cli.main(argv[:-1] + ["-1"])
    assert "--recent: must be an integer >= 0" in capsys.readouterr().err


def test_cli_generate_with_a_sink(tiny_model_dir, capsys):
    """--sink S: the anchor-cache run's tokens are what anllm_ext.generate gives with patch(model, sink=S), and
    its kept slots hold the first S tokens too."""
    from anllm_ext.anchors import decode
    from anllm_ext.config import resolve_anchors
    from anllm_ext.models import load_model

    prompt = " ".join([PROMPT + "."] * 4)
    argv = ["generate", "--model", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", str(N_NEW),
            "--prefill-chunk", "4", "--no-progress", "--ignore-eos", "--anchors", "ep", "--anchor-only"]
    assert cli.main(argv) == 0
    plain = re.search(r"KV slots kept\s+(.*)", capsys.readouterr().out).group(1)
    assert cli.main(argv + ["--sink", "3"]) == 0
    out = capsys.readouterr().out
    model, tok = load_model(tiny_model_dir)
    anchors = resolve_anchors("ep", tok, model)
    anllm_ext.patch(model, anchors, sink=3)
    ids = cli._load_prompt(cli.build_parser().parse_args(argv), tok)
    cache = anllm_ext.AnchorCache(model.config)
    want = anllm_ext.generate(model, ids, torch.ones_like(ids), prefill_chunk=4, anchor_ids=anchors, cache=cache,
                              max_new_tokens=N_NEW, eos_token_id=None, do_sample=False)
    assert generated_text(out, "anchor cache") == decode(tok, want[0, ids.shape[1]:], anchor_ids=anchors,
                                                         skip_special_tokens=True)
    assert set(range(3)) <= set(cache.kept_layout(0).positions[0].tolist())
    assert re.search(r"KV slots kept\s+(.*)", out).group(1) != plain
    with pytest.raises(SystemExit):  # argparse names the option
        cli.main(argv + ["--sink", "-1"])
    assert "--sink: must be an integer >= 0" in capsys.readouterr().err


def test_cli_generate_with_recall(tiny_model_dir, capsys):
    """--recall: a third run, the anchor cache with the --recall-* RecallConfig, whose tokens are what
    anllm_ext.generate gives with that config; its hot figures count the recalled slots and a row shows what
    stays cold. Bad recall settings fail before the model loads."""
    from anllm_ext import AnchorCache, RecallConfig
    from anllm_ext.anchors import decode
    from anllm_ext.config import resolve_anchors
    from anllm_ext.models import load_model

    prompt = " ".join([PROMPT + "."] * 4)
    argv = ["generate", "--model", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", str(N_NEW),
            "--prefill-chunk", "4", "--no-progress", "--ignore-eos", "--anchors", "ep", "--recall",
            "--recall-every", "prompt", "--recall-question", "--recall-budget", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    model, tok = load_model(tiny_model_dir)
    anchors = resolve_anchors("ep", tok, model)
    ids = cli._load_prompt(cli.build_parser().parse_args(argv), tok)
    cache = AnchorCache(model.config, recall=RecallConfig(budget=1, every="prompt", question=True))
    want = anllm_ext.generate(model, ids, torch.ones_like(ids), prefill_chunk=4, anchor_ids=anchors, cache=cache,
                              max_new_tokens=N_NEW, eos_token_id=None, do_sample=False)
    assert generated_text(out, "anchor cache + recall") == decode(tok, want[0, ids.shape[1]:], anchor_ids=anchors,
                                                                   skip_special_tokens=True)
    st = cache.stats()
    assert sum(st["recalled_slots"]) > 0
    row = re.search(r"KV slots kept\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert int(row.group(3)) == sum(st["kept_slots"]) + sum(st["recalled_slots"])
    assert re.search(r"cold KV bytes \(recall\)\s+-\s+-\s+\d", out)
    assert "anchor cache + recall: KV reduction (C-down) against the full cache" in out
    assert cli.main(argv[:-5] + ["--recall-question"]) == 2  # question needs --recall-every prompt
    assert "question=True goes with every='prompt'" in capsys.readouterr().err
    assert cli.main([a for a in argv if a != "--recall"]) == 2  # the options without the run they set
    assert "add --recall" in capsys.readouterr().err


@needs_smollm2
def test_cli_refuses_a_preset_of_another_vocabulary(tiny_model_dir, capsys):
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--no-progress", "--anchors", "anllm-ac"])
    assert rc == 2
    assert "needs '<AC>' at id 32001" in capsys.readouterr().err


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


@needs_smollm2
def test_empty_prompt_is_a_clear_error(capsys):
    from anllm_ext.cli import main

    assert main(["generate", "--prompt", "", "--no-progress", "--anchor-only", "--max-new-tokens", "1"]) == 2
    assert "anllm: error: the prompt is empty" in capsys.readouterr().err


DOCUMENT = "The keeper of Skerry Point is Agnes Moray. She has kept the light since 1987. The tower is white"
QUESTION = "Who keeps the light at Skerry Point?"


@needs_smollm2
def test_chat_prompt_is_the_document_then_the_question_in_the_chat_template(tiny_model_dir):
    """--chat: one user turn, the document then --question, with the generation prompt; --max-prompt-tokens cuts
    the document and never the question or the template."""
    from anllm_ext.models import load_model

    _, tok = load_model(tiny_model_dir)

    def prompt(*extra):
        args = cli.build_parser().parse_args(["generate", "--prompt", DOCUMENT, "--chat", "--question", QUESTION, *extra])
        return cli._load_prompt(args, tok)[0].tolist()

    def templated(content):
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"]

    assert prompt("--max-prompt-tokens", "0") == templated(DOCUMENT + "\n\n" + QUESTION)
    doc_ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    cut = prompt("--max-prompt-tokens", "6")
    assert cut == templated(tok.decode(doc_ids[:6]) + "\n\n" + QUESTION)
    assert tok.decode(cut).rstrip().endswith("assistant")


def test_question_without_chat_is_refused(capsys):
    assert cli.main(["generate", "--prompt", DOCUMENT, "--question", QUESTION, "--no-progress"]) == 2
    assert "--question is asked in a chat turn: add --chat" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA AnLLM over the tiny model: random non-zero LoRA weights, EP anchors, base_model = the tiny model."""
    import peft

    from anllm_ext.config import AnchorConfig, resolve_anchors
    from anllm_ext.models import load_model

    model, tok = load_model(tiny_model_dir)
    torch.manual_seed(0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    out = tmp_path_factory.mktemp("tiny_adapter")
    lora.save_pretrained(str(out))
    AnchorConfig("ep", resolve_anchors("ep", tok), punctuation=".", base_model=str(tiny_model_dir)).save_pretrained(out)
    return out


@needs_smollm2
def test_original_runs_the_base_model_beside_the_anllm(tiny_model_dir, tiny_adapter_dir, capsys):
    """--original: the base model the adapter names, full cache, reported first; --expect marks each answer."""
    pytest.importorskip("peft")
    from anllm_ext.models import load_model

    base, tok = load_model(tiny_model_dir)
    argv = ["generate", "--model", str(tiny_adapter_dir), "--prompt", DOCUMENT, "--chat", "--question", QUESTION,
            "--max-new-tokens", str(N_NEW), "--ignore-eos", "--no-progress", "--original"]
    assert cli.main(argv + ["--expect", "zzz-not-there"]) == 0
    out = capsys.readouterr().out
    ids = cli._load_prompt(cli.build_parser().parse_args(argv), tok)
    with torch.no_grad():
        want = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.eos_token_id)
    from anllm_ext.anchors import decode

    assert generated_text(out, "original, full cache") == decode(tok, want[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.index("(original, full cache)") < out.index("(full cache)") < out.index("(anchor cache)")
    assert re.search(r"answer has 'zzz-not-there'\s+NO\s+NO\s+NO", out)
    assert "KV reduction (C-down) against the full cache" in out
    original_text = generated_text(out, "original, full cache")
    assert cli.main(argv + ["--expect", original_text.strip()[:3]]) == 0
    assert re.search(r"answer has '.*'\s+yes\s", capsys.readouterr().out)


def test_original_needs_a_model_that_names_it(tiny_model_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--original", "--no-progress"]) == 2
    assert "only a LoRA AnLLM" in capsys.readouterr().err


@pytest.mark.parametrize("found, verdict", [
    ((True, True, True), "the anchor cache's answer holds 'x'"),
    ((True, True, False), "failure: only the anchor cache misses 'x'"),
    ((True, False, False), "failure: the AnLLM misses 'x' with its full cache too, so the anchor cache did not lose "
                           "it; the conversion did (the original model finds it)"),
    ((False, False, False), "failure: the original model misses 'x' too, with its full cache: neither the conversion "
                            "nor the anchor cache lost it"),
    ((False, True, False), "failure: only the anchor cache misses 'x'"),
])
def test_expect_verdict_names_where_the_fact_was_lost(found, verdict):
    runs = [{"label": label} for label in ("original, full cache", "full cache", "anchor cache")]
    texts = ["... x ..." if f else "..." for f in found]
    assert side_by_side._expect_verdict("x", runs, texts).startswith(verdict)
    assert side_by_side._expect_verdict("x", runs[1:], texts[1:]).startswith(  # no original run: no guess
        "the anchor cache's answer holds" if found[2] else "failure: only the anchor cache misses" if found[1] else
        "failure: the AnLLM misses 'x' with its full cache too, so the anchor cache did not lose it; whether the "
        "conversion did, --original shows")
    assert side_by_side._expect_verdict("x", runs[2:], texts[2:]).startswith(
        "the anchor cache's answer holds" if found[2] else "failure: the anchor cache's answer misses")
    for recalled in (True, False):  # a recall run (last) adds its own line
        both = side_by_side._expect_verdict("x", runs + [{"label": "anchor cache + recall"}],
                                            texts + ["x" if recalled else "-"])
        assert both == side_by_side._expect_verdict("x", runs, texts) + (
            f"\nwith recall: the answer {'holds' if recalled else 'misses'} 'x'")
    extra = [{"label": "anchor cache + recent 2"}, {"label": "anchor cache + recall"}]  # both extra runs: a line each
    assert side_by_side._expect_verdict("x", runs + extra, texts + ["x", "-"]) == side_by_side._expect_verdict(
        "x", runs, texts) + "\nwith recent 2: the answer holds 'x'\nwith recall: the answer misses 'x'"
