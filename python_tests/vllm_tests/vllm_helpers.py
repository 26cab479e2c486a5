"""What the vLLM plugin tests share besides fixtures (test modules import from here, never from conftest)."""
import torch

# every engine of these tests: fp32 for exact comparisons, eager mode (no compile time), a short context
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)


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
        anllm_ext.patch(model)  # the anchors saved in the directory's config.json
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


def sentences(n_max=400):
    """English sentences (Python's documentation prose when installed, else a bundled paragraph)."""
    import re

    from anllm_ext.sample_text import sample_text

    text = re.sub(r"\s+", " ", sample_text(60000))
    parts = [s.strip() + "." for s in text.split(". ") if 20 < len(s.strip()) < 300]
    return parts[:n_max]
