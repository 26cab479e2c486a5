"""`anllm generate` on a tiny local model directory (fast) and argument errors."""

import pytest
import torch

from anllm_ext import cli

from helpers import needs_smollm2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from anllm_ext.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@needs_smollm2
@pytest.mark.parametrize("anchors", ["ep", "ac", "13,30"])
def test_cli_generate_on_local_dir(tiny_model_dir, capsys, anchors):
    rc = cli.main(["generate", "--model", tiny_model_dir, "--prompt", "The sun rose. Birds sang. The day began",
                   "--max-new-tokens", "5", "--prefill-chunk", "4", "--no-progress", "--ignore-eos",
                   "--anchors", anchors])
    out = capsys.readouterr().out
    assert rc == 0, out
    for key in ("full cache", "anchor cache", "KV bytes", "peak KV bytes", "decode tokens/s", "KV reduction"):
        assert key in out


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
