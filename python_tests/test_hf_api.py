"""What a transformers user runs into around `patch`: AnchorCache(model), copy.deepcopy of a patched model,
user-supplied position_ids, left padding without anchors vs the unpatched model, models split over
devices, anchor presets on a foreign vocabulary, torch.autocast, and the ops without transformers."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache, is_patched, patch, unpatch
from anllm_ext.anchors import PRESETS
from anllm_ext.config import resolve_anchors
from anllm_ext.errors import UnsupportedError
from anllm_ext.hf import cache_kwarg, patched_anchor_ids
from anllm_ext.layout import token_layout
from anllm_ext.reference import ansan_mask

from helpers import needs_smollm2
from helpers import MODEL_ANCHOR as ANCHOR, cached_logits, generated_cache, single_pass_logits, model_stream, tiny_model


def true_positions(mask):
    """What generate() and a patched model use: the number of real tokens before each token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_anchor_cache_takes_a_model_or_its_config():
    model = patch(tiny_model("llama"), ANCHOR)
    ids, mask = model_stream(2, 20, seed=1, left_pad=(0, 4))
    from_model, from_config = AnchorCache(model), AnchorCache(model.config)
    assert len(from_model.layers) == len(from_config.layers) == model.config.num_hidden_layers
    outs = []
    for cache in (from_model, from_config):
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache}).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert from_model.lengths() == from_config.lengths()
    with pytest.raises(TypeError, match=r"model\.config"):
        AnchorCache("llama")


def test_deepcopy_of_a_patched_model_has_its_own_patch():
    base = tiny_model("llama", seed=2)
    ids, mask = model_stream(2, 30, seed=16, left_pad=(0, 5))
    other = [ANCHOR] + sorted(set(ids[0, 10:13].tolist()) - {ANCHOR})  # ids the input holds: they change the mask
    original = patch(copy.deepcopy(base), ANCHOR)
    clone = copy.deepcopy(original)
    patch(clone, other)
    assert patched_anchor_ids(original).tolist() == [ANCHOR]
    ref_original = single_pass_logits(patch(copy.deepcopy(base), ANCHOR), ids, mask)
    ref_clone = single_pass_logits(patch(copy.deepcopy(base), other), ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(single_pass_logits(original, ids, mask)[keep], ref_original[keep], atol=0, rtol=0)
    torch.testing.assert_close(single_pass_logits(clone, ids, mask)[keep], ref_clone[keep], atol=0, rtol=0)
    assert not torch.allclose(ref_original[keep], ref_clone[keep], atol=1e-3)
    # each copy's generate() default cache belongs to that copy
    gen = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)
    assert clone._prepare_cache_for_generation.__self__ is clone
    assert isinstance(generated_cache(clone.generate(ids, **gen)), AnchorCache)
    # unpatching the copy leaves the original patched
    unpatch(clone)
    assert is_patched(original) and not is_patched(clone)
    torch.testing.assert_close(single_pass_logits(original, ids, mask)[keep], ref_original[keep], atol=0, rtol=0)
    torch.testing.assert_close(single_pass_logits(clone, ids), single_pass_logits(base, ids), atol=0, rtol=0)


def test_position_ids_must_be_the_true_positions():
    model = patch(tiny_model("llama"), ANCHOR)
    ids, mask = model_stream(2, 24, seed=17, left_pad=(0, 6))
    plain = single_pass_logits(model, ids, mask)
    with torch.no_grad():
        given = model(input_ids=ids, attention_mask=mask, position_ids=true_positions(mask), use_cache=False).logits
        torch.testing.assert_close(given, plain, atol=0, rtol=0)
        # padding entries are not compared (generate() puts placeholders there)
        placeholder = true_positions(mask).masked_fill(mask == 0, 1)
        model(input_ids=ids, attention_mask=mask, position_ids=placeholder, use_cache=False)
        columns = torch.arange(24).expand(2, 24)  # what a direct call of the unpatched model would use
        with pytest.raises(ValueError, match=r"position_ids\[1, 6\] = 6 but the token's true absolute position is 0"):
            model(input_ids=ids, attention_mask=mask, position_ids=columns, use_cache=False)
        with pytest.raises(ValueError, match="shape"):
            model(input_ids=ids, attention_mask=mask, position_ids=columns[:, :5], use_cache=False)
        # with a cache: positions continue after the real tokens it holds
        cache = AnchorCache(model)
        model(input_ids=ids[:, :20], attention_mask=mask[:, :20], use_cache=True, **{cache_kwarg(model): cache})
        nxt = true_positions(mask)[:, 20:21]
        model(input_ids=ids[:, 20:21], attention_mask=mask[:, :21], position_ids=nxt, use_cache=True,
              **{cache_kwarg(model): cache})
        with pytest.raises(ValueError, match="true absolute position"):
            model(input_ids=ids[:, 21:22], attention_mask=mask[:, :22], position_ids=torch.full((2, 1), 21),
                  use_cache=True, **{cache_kwarg(model): cache})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_no_anchors_left_padded_equals_unpatched(family):
    """The docs' rule: with no anchor in the input (and none generated), a patched model computes what the
    unpatched model computes at the same positions; generate() gives both the same positions."""
    model = tiny_model(family)
    ids, mask = model_stream(3, 28, seed=18, anchor_p=0.0, left_pad=(0, 5, 11))
    keep = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=true_positions(mask)).logits
    gen = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, suppress_tokens=[ANCHOR])
    gen_ref = model.generate(ids, **gen)
    patch(model, ANCHOR)
    torch.testing.assert_close(single_pass_logits(model, ids, mask)[keep], ref[keep], atol=2e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, **gen), gen_ref)
    assert torch.equal(anllm_ext.generate(model, ids, prefill_chunk=6, **gen), gen_ref)


def test_model_split_over_devices_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].to("meta")  # stands in for a second device
    with pytest.raises(UnsupportedError, match=r"split over devices \['cpu', 'meta'\]"):
        patch(model, ANCHOR)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"
    model = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    with pytest.raises(UnsupportedError, match="device_map"):
        patch(model, ANCHOR)
    model.hf_device_map = {"": "cpu"}  # one device: fine
    assert is_patched(patch(model, ANCHOR))


def llama2_like_tokenizer():
    """A word-level tokenizer with the released AnLLM checkpoints' ids: [PAD] 32000, <AC> 32001, "." 29889."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(32000)}
    vocab.pop("w29889")
    vocab.update({".": 29889, "[PAD]": 32000, "<AC>": 32001})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")))


def test_presets_are_checked_against_the_tokenizer_and_set_padding():
    tok = llama2_like_tokenizer()
    assert tok.pad_token_id is None
    model = tiny_model("llama")
    model.generation_config.pad_token_id = None
    assert resolve_anchors("anllm-ac", tok, model) == [32001]
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == PRESETS["anllm-ac"].pad_id == 32000
    assert model.generation_config.pad_token_id == 32000
    assert resolve_anchors("anllm-ep", tok) == [29889]
    small = tiny_vocab_tokenizer()
    with pytest.raises(ValueError, match="id 32001 is not in this vocabulary"):
        resolve_anchors("anllm-ac", small)
    renamed = llama2_like_tokenizer()
    renamed.add_tokens(["<AC2>"])  # id 32002: <AC> itself stays at 32001
    assert resolve_anchors("anllm-ac", renamed) == [32001]


def tiny_vocab_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, ".": 1}, unk_token="a")))


@needs_smollm2
def test_presets_refuse_the_smollm2_vocabulary():
    from transformers import AutoTokenizer

    from anllm_ext.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    assert len(tok) > 32001  # the ids exist, but they are ordinary tokens there
    with pytest.raises(ValueError, match=r"needs '<AC>' at id 32001, but id 32001 is '"):
        resolve_anchors("anllm-ac", tok)
    with pytest.raises(ValueError, match="at id 29889"):
        resolve_anchors("anllm-ep", tok)


AUTOCAST_CASES = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dt, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))
    for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("device_type,dtype", AUTOCAST_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_autocast(device_type, dtype):
    """Under torch.autocast (CPU bf16; CUDA fp16 and bf16) RoPE leaves q/k in fp32 and v in the autocast dtype:
    the patched model attends in that dtype (as SDPA does) and stays as close to the fp32 computation as
    transformers' eager attention does, in one pass, cached decoding and a training step."""
    model32 = tiny_model("llama").to(device_type)
    ids, mask = model_stream(2, 40, seed=6)  # no padding: eager attention at low precision turns it into NaN
    ids, mask = ids.to(device_type), mask.to(device_type)
    layout = token_layout(ids, ANCHOR, mask)
    allowed = ansan_mask(layout, layout)[:, None]
    additive = torch.zeros(allowed.shape, device=device_type).masked_fill(~allowed, torch.finfo(torch.float32).min)
    eager = copy.deepcopy(model32)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref32 = eager(input_ids=ids, attention_mask=additive, position_ids=layout.positions).logits
        with torch.autocast(device_type, dtype=dtype):
            eager_low = eager(input_ids=ids, attention_mask=additive, position_ids=layout.positions).logits.float()
    torch_err = (eager_low - ref32).abs().max().item()
    assert torch_err > 0  # autocast really computed in low precision

    model = patch(copy.deepcopy(model32), ANCHOR)
    with torch.autocast(device_type, dtype=dtype):
        single = single_pass_logits(model, ids, mask).float()
        cached, cache = cached_logits(model, ids, mask, n_prompt=30, chunk=8)
        dyn = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             cache_implementation="dynamic")
    assert cache.layers[0].keys.dtype == cache.layers[0].values.dtype == dtype
    assert dyn.shape == (2, 43)
    for got in (single, cached.float()):
        err = (got - ref32).abs().max().item()
        assert err <= 2 * torch_err + 1e-2, (err, torch_err)
    # training step under autocast: fp32 parameters get finite gradients close to the fp32 ones
    model.train()
    with torch.autocast(device_type, dtype=dtype):
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().square().mean().backward()
    g = model.model.layers[0].self_attn.q_proj.weight.grad
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_ops_work_without_transformers():
    """`import anllm_ext` and the ops need torch only; the integration says which extra to install."""
    code = r"""
import sys
sys.modules["transformers"] = None  # any import of transformers fails
import torch, anllm_ext
ids = torch.tensor([[5, 1, 6, 7, 1, 8, 9]])
lay = anllm_ext.token_layout(ids, [1])
q, k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 1, 7, 16), torch.randn(1, 1, 7, 16)
torch.testing.assert_close(anllm_ext.anchor_attention(q, k, v, lay, lay),
                           anllm_ext.reference.anchor_attention_ref(q, k, v, lay, lay), atol=1e-5, rtol=1e-5)
keep = lay.is_anchor | (lay.segments == 2)
assert anllm_ext.compact_kv_([k.clone()], [v.clone()], keep, torch.tensor([7])).tolist() == [int(keep.sum())]
assert anllm_ext.split_sentences("The sun rose. Birds sang.") == ["The sun rose. ", "Birds sang."]
try:
    anllm_ext.AnchorCache
except ImportError as e:
    print("IMPORT-ERROR:", e)
print("OK")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(anllm_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stderr
    assert "IMPORT-ERROR: anllm_ext.AnchorCache needs transformers" in run.stdout and "[hf]" in run.stdout
    assert run.stdout.strip().endswith("OK")


def test_patch_scopes_put_back_what_was_there():
    """`patched(model, anchors)` and `unpatched(model)`: inside, the asked-for state; after, the one before (anchors,
    the configuration the model carries and its default cache); an AnchorConfig given to `patch` is carried as is."""
    from anllm_ext import patched, unpatched
    from anllm_ext.config import AnchorConfig

    model = tiny_model("llama")
    ep = AnchorConfig("ep", [ANCHOR, 9], punctuation=".")
    patch(model, ep, default_cache="full")
    assert AnchorConfig.from_model(model) == ep  # carried as given, not re-derived as "ids"
    with unpatched(model):
        assert not is_patched(model) and AnchorConfig.from_model(model) is None
    assert is_patched(model) and AnchorConfig.from_model(model) == ep and patched_anchor_ids(model).tolist() == [ANCHOR, 9]
    assert model._anllm_patch_state.default_cache == "full"
    with patched(model, [11]):
        assert patched_anchor_ids(model).tolist() == [11]
    assert AnchorConfig.from_model(model) == ep and model._anllm_patch_state.default_cache == "full"
    unpatch(model)
    with unpatched(model):  # an unpatched model is used as it is
        assert not is_patched(model)
    assert not is_patched(model)


def test_patched_without_anchors_uses_the_patch_or_the_saved_configuration():
    from anllm_ext import patched
    from anllm_ext.config import AnchorConfig

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="carries no anchor configuration"):
        with patched(model):
            pass
    AnchorConfig("ids", [ANCHOR]).attach(model)  # e.g. a trained AnLLM loaded from disk
    with patched(model):
        assert patched_anchor_ids(model).tolist() == [ANCHOR]
    assert not is_patched(model)
    patch(model, [5])
    with patched(model):  # a patched model keeps its patch
        assert patched_anchor_ids(model).tolist() == [5]
    assert patched_anchor_ids(model).tolist() == [5]
