"""What the vLLM plugin tests share besides fixtures (test modules import from here, never from conftest)."""
import torch

# every engine of these tests: fp32 for exact comparisons, eager mode (no compile time), a short context
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)


def engine_config(model_dir, **kw):
    """The finished engine config of ``LLM(model=model_dir, **kw)`` (what the plugin checks and reads at engine
    start), without starting an engine."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), **{**ENGINE_ARGS, **kw}).create_engine_config()


def shutdown(llm) -> None:
    """Stop an offline engine's core process now (not at interpreter exit, when logging is already closed)."""
    llm.llm_engine.engine_core.shutdown()


def reference(model_dir, prompt_ids, anchors: bool, max_new: int, recent: int = 0):
    """Greedy continuations and their logprobs with transformers: anllm_ext.generate (anchors; with
    ``AnchorCache(recent=recent)``) or plain full-attention generate."""
    import anllm_ext
    from anllm_ext.models import load_model

    model, _ = load_model(str(model_dir))
    if anchors:
        anllm_ext.patch(model)  # the anchors (and sink) saved in the directory's config.json
    result = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        kw = dict(max_new_tokens=max_new, do_sample=False, output_logits=True, return_dict_in_generate=True)
        if anchors:
            out = anllm_ext.generate(model, x, cache=anllm_ext.AnchorCache(model.config, recent=recent), **kw)
        else:
            out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        new = out.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, new)]
        result.append((new, logprobs))
    return result


def blocks_for(rule, tokens, block_size: int, new_tokens: int = 0) -> int:
    """KV blocks of a request's kept slots after computing ``tokens`` under ``rule`` (a
    ``anllm_ext.vllm.compaction.KeepRule``), plus room for ``new_tokens`` being computed."""
    return -(-(rule.num_kept(tokens) + new_tokens) // block_size)


def assert_holds_its_kept_blocks(report, prompt_ids, rule) -> list:
    """An engine_probe report: after every step each request holds exactly the blocks of its kept slots under
    ``rule``, and while a step runs those of its kept slots plus the step's tokens. Returns every request's
    (tokens computed, blocks held) after every step, to compare with another rule."""
    B = report["block_size"]
    states = []
    for prompt, output, held, allocated in zip(prompt_ids, report["outputs"], report["held"], report["allocated"]):
        tokens = prompt + output
        for n, blocks in held:
            assert blocks == blocks_for(rule, tokens[:n], B), (n, blocks, held)
            states.append((tokens[:n], blocks))
        for n, q, blocks in allocated:
            assert blocks == blocks_for(rule, tokens[:n], B, q), (n, q, blocks)
    return states


def expected_cached(first, later, rule, block_size: int) -> int:
    """Tokens of ``later`` that the anchor blocks of ``first`` (under ``rule``) stand for: the blocks that end
    inside their common prefix, before ``later``'s last token (always computed)."""
    common = next((i for i, (a, b) in enumerate(zip(first, later)) if a != b), min(len(first), len(later)))
    ends = rule.anchor_block_ends(later, block_size)
    ends = ends[ends <= min(common, len(later) - 1)]
    return int(ends[-1]) if len(ends) else 0


def sentences(n_max=400):
    """English sentences (Python's documentation prose when installed, else a bundled paragraph)."""
    import re

    from anllm_ext.sample_text import sample_text

    text = re.sub(r"\s+", " ", sample_text(60000))
    parts = [s.strip() + "." for s in text.split(". ") if 20 < len(s.strip()) < 300]
    return parts[:n_max]
