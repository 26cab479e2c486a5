"""The needle-recall evaluation's prompt builder and argument checks (anllm_ext/evaluation/needle.py); the runs
themselves are measurements (docs/results/recall/), not tests."""
import pytest

from anllm_ext.evaluation.needle import build_prompt, haystack_text, make_trials, run_needle

from helpers import TEXT

PARAGRAPHS = [TEXT.replace("\n\n", " ")] * 3


def test_trials_cover_every_cell_reproducibly():
    trials = make_trials([64, 128], [0.0, 0.5, 1.0], 2, len(PARAGRAPHS), seed=3)
    assert len(trials) == 12 and trials == make_trials([64, 128], [0.0, 0.5, 1.0], 2, len(PARAGRAPHS), seed=3)
    assert {(t.length, t.depth) for t in trials} == {(n, d) for n in (64, 128) for d in (0.0, 0.5, 1.0)}
    assert all(len(t.code) == 4 and t.code.isdigit() for t in trials)


@pytest.mark.parametrize("bad, message", [(dict(depths=[1.5]), "fractions in"), (dict(lengths=[8]), ">= 32"),
                                          (dict(per_cell=0), "per_cell >= 1")])
def test_bad_trial_settings_say_what_is_wrong(bad, message):
    args = dict(lengths=[64], depths=[0.5], per_cell=1, paragraphs=3) | bad
    with pytest.raises(ValueError, match=message):
        make_trials(**args)


def test_the_needle_is_a_sentence_of_its_own_at_its_depth(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for trial in make_trials([120], [0.0, 0.5, 1.0], 1, len(PARAGRAPHS), seed=0):
        text = haystack_text(tok, PARAGRAPHS, trial)
        at = text.index(trial.needle)
        assert at == 0 or text[:at].rstrip().endswith(".")  # starts a sentence
        assert abs(at / len(text) - trial.depth) < 0.35
        n = len(tok(text.replace(trial.needle, ""))["input_ids"])
        assert 60 <= n <= 130
        prompt = tok.decode(build_prompt(tok, PARAGRAPHS, trial)[0])
        assert trial.needle in prompt and prompt.rstrip().endswith("assistant")


def test_run_needle_refuses_a_policy_it_does_not_know():
    with pytest.raises(ValueError, match="unknown needle policy"):
        run_needle(None, None, PARAGRAPHS, [], "dense")
    with pytest.raises(ValueError, match="takes a RecallConfig"):
        run_needle(None, None, PARAGRAPHS, [], "recall")
