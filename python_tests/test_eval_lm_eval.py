"""The lm-evaluation-harness backend (``--model anllm``) on the shipped local task (tasks/), offline.

Skipped only when lm-eval is not installed (CI installs it)."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import needs_smollm2, save_tiny_model

lm_eval = pytest.importorskip("lm_eval")

import anllm_ext.lm_eval_backend  # noqa: E402,F401  (registers "anllm")
from anllm_ext import evaluation as ev  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = needs_smollm2  # the tiny models use the bundled tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from anllm_ext.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_lm_eval"), tok, bos_token_id=1, eos_token_id=2)


def _evaluate(model, model_args, shots=2, limit=5, task="anllm_capitals_ep"):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], num_fewshot=shots, limit=limit,
                                  batch_size=4, device="cpu", task_manager=TaskManager(include_path=str(REPO / "tasks")),
                                  log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    scores = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return out["results"][task], scores


def test_backend_modes_on_local_task(tiny_dir):
    """full == lm-eval's own hf backend; cached == ansan; k-shot prompts with EP-ended demonstrations."""
    ref, ref_scores = _evaluate("hf", f"pretrained={tiny_dir},dtype=float32")
    full, full_scores = _evaluate("anllm", f"pretrained={tiny_dir},anchors=ep,mode=full")
    ansan, ansan_scores = _evaluate("anllm", f"pretrained={tiny_dir},anchors=ep,mode=ansan")
    cached, cached_scores = _evaluate("anllm", f"pretrained={tiny_dir},anchors=ep,mode=cached,prefill_chunk=16")
    assert len(ref_scores) == 5 and all(len(s) == 4 for s in ref_scores)
    torch.testing.assert_close(torch.tensor(full_scores), torch.tensor(ref_scores), atol=1e-4, rtol=0)
    assert full["acc,none"] == ref["acc,none"] and full["acc_norm,none"] == ref["acc_norm,none"]
    torch.testing.assert_close(torch.tensor(cached_scores), torch.tensor(ansan_scores), atol=1e-4, rtol=0)
    assert cached["acc,none"] == ansan["acc,none"]
    assert (torch.tensor(ansan_scores) - torch.tensor(full_scores)).abs().max() > 1e-3  # the mask is in effect


def test_state_facts_group(tiny_dir):
    """The shipped group anllm_state_facts_ep: three tasks, each k-shot prompt's demonstrations from its own
    relation (a postal-code prompt demonstrates postal codes), periods ending them, one acc over the group."""
    import re

    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="anllm", model_args=f"pretrained={tiny_dir},anchors=ep,mode=cached",
                                  tasks=["anllm_state_facts_ep"], num_fewshot=2, limit=3, batch_size=4, device="cpu",
                                  task_manager=TaskManager(include_path=str(REPO / "tasks")), log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    tasks = [f"anllm_state_{r}_ep" for r in ("capital", "postal", "flower")]
    assert set(out["samples"]) == set(tasks)
    for sample in out["samples"]["anllm_state_postal_ep"]:
        context = sample["arguments"][0][0]
        assert len(re.findall(r"\nAnswer: [A-Z]{2}\.\n\n", context)) == 2, context
        assert context.endswith(f"Question: {sample['doc']['question']}\nAnswer:")
    assert 0.0 <= out["results"]["anllm_state_facts_ep"]["acc,none"] <= 1.0


def _model(tiny_dir, mode, **kw):
    from lm_eval.api.registry import get_model

    return get_model("anllm")(pretrained=tiny_dir, anchors="ep", mode=mode, **kw)


def test_backend_rolling_and_generation(tiny_dir):
    text = "The sun rose. Birds sang in the old trees. The day began slowly, and the town woke up."
    req = SimpleNamespace(args=(text,))
    rolling = {m: _model(tiny_dir, m, max_length=12, prefill_chunk=5) for m in ev.MODES}
    got = {m: lm.loglikelihood_rolling([req], disable_tqdm=True)[0] for m, lm in rolling.items()}
    # with max_length >= the text, the rolling log-likelihood is the perplexity pass over [eot] + text
    lm = _model(tiny_dir, "full")
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    whole = ev.perplexity(lm.model, [ids], modes=("full",), progress=False)["full"]
    assert lm.loglikelihood_rolling([req], disable_tqdm=True)[0] == pytest.approx(-whole.nll * whole.tokens, abs=1e-3)
    assert got["cached"] == pytest.approx(got["ansan"], abs=1e-3)
    assert got["full"] != pytest.approx(got["ansan"], abs=1e-2)
    gen = SimpleNamespace(args=("Once upon a time. There was", {"until": ["\n\n"], "max_gen_toks": 6}))
    texts = {m: _model(tiny_dir, m).generate_until([gen], disable_tqdm=True)[0] for m in ("ansan", "cached")}
    assert texts["ansan"] == texts["cached"] and isinstance(texts["cached"], str)


def test_backend_recall_mode(tiny_dir):
    """mode=cached+recall: the rolling log-likelihood is anllm_ext's perplexity with the same RecallConfig, and
    generation runs through an AnchorCache that recalls."""
    from anllm_ext import RecallConfig

    text = ("The sun rose over the hills. Birds sang in the old trees. The baker opened his shop. Children ran to "
            "school. The day began slowly, and the town woke up. The sun rose over the hills again.")
    req = SimpleNamespace(args=(text,))
    args = dict(max_length=64, prefill_chunk=4, recall_budget=1, recall_every="token", recall_score="peak")
    lm = _model(tiny_dir, "cached+recall", **args)
    assert lm.recall == RecallConfig(budget=1, every="token", score="peak")
    got = lm.loglikelihood_rolling([req], disable_tqdm=True)[0]
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    want = ev.perplexity(lm.model, [ids], modes=("cached+recall",), prefill_chunk=4, progress=False,
                         anchor_ids=lm.anchors, recall=lm.recall)["cached+recall"]
    assert got == pytest.approx(-want.nll * want.tokens, abs=1e-3)
    plain = _model(tiny_dir, "cached", max_length=64, prefill_chunk=4).loglikelihood_rolling([req], disable_tqdm=True)[0]
    assert got != pytest.approx(plain, abs=1e-3)  # recall is in effect
    gen = SimpleNamespace(args=(text, {"until": ["\n\n"], "max_gen_toks": 4}))
    assert isinstance(lm.generate_until([gen], disable_tqdm=True)[0], str)


def test_backend_recent_mode(tiny_dir):
    """mode=cached+recent: the rolling log-likelihood is anllm_ext's perplexity keeping the same recent sentences hot,
    and generation runs through such a cache."""
    text = ("The sun rose over the hills. Birds sang in the old trees. The baker opened his shop. Children ran to "
            "school. The day began slowly, and the town woke up. The sun rose over the hills again.")
    req = SimpleNamespace(args=(text,))
    lm = _model(tiny_dir, "cached+recent", max_length=64, prefill_chunk=4, recent=1)
    assert lm.recent == 1
    got = lm.loglikelihood_rolling([req], disable_tqdm=True)[0]
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    want = ev.perplexity(lm.model, [ids], modes=("cached+recent",), prefill_chunk=4, progress=False,
                         anchor_ids=lm.anchors, recent=1)["cached+recent"]
    assert got == pytest.approx(-want.nll * want.tokens, abs=1e-3)
    plain = _model(tiny_dir, "cached", max_length=64, prefill_chunk=4).loglikelihood_rolling([req], disable_tqdm=True)[0]
    assert got != pytest.approx(plain, abs=1e-3)  # the recent sentences are read
    gen = SimpleNamespace(args=(text, {"until": ["\n\n"], "max_gen_toks": 4}))
    assert isinstance(lm.generate_until([gen], disable_tqdm=True)[0], str)


def test_backend_bad_args(tiny_dir):
    with pytest.raises(ValueError, match="mode must be one of"):
        _model(tiny_dir, "fast")
    with pytest.raises(ValueError, match=r"unknown model_args \['anchor'\]"):
        _model(tiny_dir, "cached", anchor="ep")
    with pytest.raises(ValueError, match=r"recall_budget apply to mode=cached\+recall only"):
        _model(tiny_dir, "cached", recall_budget=2)
    with pytest.raises(ValueError, match=r"recent applies to mode=cached\+recent only"):
        _model(tiny_dir, "cached", recent=2)
    with pytest.raises(ValueError, match="recent must be an integer >= 1"):
        _model(tiny_dir, "cached+recent", recent=0)
    with pytest.raises(ValueError, match="RecallConfig.every must be one of"):
        _model(tiny_dir, "cached+recall", recall_every="chunk")
    with pytest.raises(ValueError, match="recall_layers takes layer indices joined by ';'"):
        _model(tiny_dir, "cached+recall", recall_pool="layers", recall_layers="0,1")


def test_backend_recall_layers_arg(tiny_dir):
    """recall_index / recall_pool / recall_layers / recall_question reach the RecallConfig (lm-eval passes
    strings)."""
    from anllm_ext import RecallConfig

    lm = _model(tiny_dir, "cached+recall", recall_index="tokens", recall_pool="layers", recall_layers="1;0")
    assert lm.recall == RecallConfig(index="tokens", pool="layers", layers=(0, 1))
    lm = _model(tiny_dir, "cached+recall", recall_every="prompt", recall_question="True")
    assert lm.recall == RecallConfig(every="prompt", question=True)
    with pytest.raises(ValueError, match="recall_question takes true or false"):
        _model(tiny_dir, "cached+recall", recall_every="prompt", recall_question="yes")


def test_cli_on_smollm2():
    """`python -m anllm_ext.lm_eval_backend run --model anllm` on the bundled SmolLM2, end to end."""
    # the anllm_ext this test imported (installed in CI), not the source tree in the working directory
    # (PYTHONSAFEPATH: `-m` does not put the working directory first on sys.path)
    imported_from = os.path.dirname(os.path.dirname(os.path.abspath(anllm_ext.__file__)))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=imported_from, PYTHONSAFEPATH="1")
    cmd = [sys.executable, "-m", "anllm_ext.lm_eval_backend", "run", "--model", "anllm",
           "--model_args", "mode=cached,threads=2", "--tasks", "anllm_capitals_ep", "--include_path", "tasks",
           "--limit", "6", "--num_fewshot", "1", "--batch_size", "8", "--device", "cpu"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "anllm_capitals_ep" in p.stdout and "acc" in p.stdout
