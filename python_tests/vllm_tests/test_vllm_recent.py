"""Recent sentences kept hot in vLLM (``additional_config={"anllm_recent": N}``, what ``AnchorCache(recent=N)``
does for transformers): greedy tokens equal anllm_ext.generate with that cache for prompts submitted together
(continuous batching, chunked prefill), and differ from the plain anchor cache's on some prompt (else the
comparison would prove nothing); after every step each request holds exactly the blocks of its kept slots under
the recent rule; bad settings fail at engine start.

The engine runs in a process of its own (engine_probe.py) with 32-slot blocks, so the few extra slots of the
recent sentences change how many blocks a request holds."""
import pytest

from anllm_ext import UnsupportedError
from anllm_ext.vllm.compaction import KeepRule
from anllm_ext.vllm.detect import recent_of
from engine_probe import probe
from vllm_helpers import assert_holds_its_kept_blocks, blocks_for, engine_config, reference, sentences

RECENT = 2
MAX_NEW = 12
B = 32
ENGINE = dict(block_size=B, max_model_len=2048, max_num_batched_tokens=256, max_num_seqs=8,
              num_gpu_blocks_override=200, enable_prefix_caching=False, additional_config={"anllm_recent": RECENT})


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    """Prompts of 1 to 30 sentences (a few tokens to ~750: the long ones are prefilled in chunks)."""
    sents = sentences()
    return [tokenizer(" ".join(sents[(11 * i + 5 + k) % len(sents)] for k in range(n)))["input_ids"]
            for i, n in enumerate((1, 3, 5, 8, 12, 18, 24, 30))]


def test_recent_generates_anchor_caches_tokens_and_holds_its_kept_slots(anllm_dir, prompt_ids, anchor_ids):
    report = probe(anllm_dir, prompt_ids, MAX_NEW, **ENGINE)
    assert report["scheduler"] == "AnchorScheduler" and report["block_size"] == B
    assert max(s["running"] for s in report["steps"]) >= 4  # batched decodes beside prefill chunks
    assert max(len(p) for p in prompt_ids) > 2 * ENGINE["max_num_batched_tokens"]  # chunked prefill

    expected = reference(anllm_dir, prompt_ids, anchors=True, max_new=MAX_NEW, recent=RECENT)
    for i, (got, (want, _)) in enumerate(zip(report["outputs"], expected)):
        assert got[: len(want)] == want, f"prompt {i} ({len(prompt_ids[i])} tokens): vLLM {got} != {want}"
    plain = reference(anllm_dir, prompt_ids, anchors=True, max_new=MAX_NEW)
    assert any(p != w for (p, _), (w, _) in zip(plain, expected)), "recent=2 changed no token: the test proves nothing"

    states = assert_holds_its_kept_blocks(report, prompt_ids, KeepRule(anchor_ids, RECENT))
    # the recent sentences held blocks that the plain rule would have freed
    assert any(blocks != blocks_for(KeepRule(anchor_ids), tokens, B) for tokens, blocks in states)


def test_recent_setting_reaches_the_engine_config(anllm_dir):
    """From ``LLM(..., additional_config=...)`` (EngineArgs) and from the command line (``--additional-config``);
    0 when absent."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = engine_config(anllm_dir, enable_prefix_caching=False, additional_config={"anllm_recent": 3})
    assert recent_of(config) == 3
    assert recent_of(engine_config(anllm_dir)) == 0
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(anllm_dir), "--dtype", "float32", "--max-model-len", "2048",
                              "--no-enable-prefix-caching", "--additional-config", '{"anllm_recent": 2}'])
    assert recent_of(EngineArgs.from_cli_args(args).create_engine_config()) == 2


@pytest.mark.parametrize("value, error, words", [
    (-1, ValueError, "must be an integer >= 0, got -1"),
    (1.5, TypeError, "must be an integer >= 0, got 1.5"),
    ("2", TypeError, "must be an integer >= 0, got '2'"),
    (True, TypeError, "must be an integer >= 0, got True"),
])
def test_bad_recent_setting_fails_at_engine_start(anllm_dir, plain_dir, value, error, words):
    for model_dir in (anllm_dir, plain_dir):
        with pytest.raises(error, match=words):
            engine_config(model_dir, enable_prefix_caching=False, additional_config={"anllm_recent": value})


def test_recent_setting_refusals(anllm_dir, plain_dir):
    """A misspelt key; prefix caching (vLLM's default) with recent sentences; the setting for a model that is no
    AnLLM (0 there is accepted: it is the default)."""
    with pytest.raises(ValueError, match="anllm_recnet"):
        engine_config(anllm_dir, additional_config={"anllm_recnet": 2})
    with pytest.raises(UnsupportedError, match="prefix caching with anllm_recent=2 .*enable_prefix_caching=False"):
        engine_config(anllm_dir, additional_config={"anllm_recent": 2})
    engine_config(anllm_dir, additional_config={"anllm_recent": 0})  # the default: prefix caching stays on
    with pytest.raises(UnsupportedError, match="anllm_recent=2 .* has no anchor configuration"):
        engine_config(plain_dir, enable_prefix_caching=False, additional_config={"anllm_recent": 2})
    engine_config(plain_dir, additional_config={"anllm_recent": 0})
