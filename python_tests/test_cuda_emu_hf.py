"""The transformers-level exactness with the CUDA kernels: a tiny random Llama, patched, runs every attention,
cache-append and compaction call through the emulated CUDA kernels (csrc/cuda/ under csrc/emu/), as it would
on a GPU. anllm_ext's op wrappers are routed to torch.ops.anllm_cuda_emu (emu_helpers.route_ops_to_emulator,
undone after each test); token_layout stays the CPU kernel (on a GPU it is ATen ops, not a CUDA kernel).

- chunked prefill with compaction, then token-by-token decoding with compaction at generated anchors, gives
  the logits of one masked pass (itself through the emulated forward), and that pass equals the CPU kernels';
- a batch with mixed left padding gives every row's logits alone;
- the patched pass's gradients (emulated backward kernels) equal the CPU kernels'.
"""
import pytest
import torch

from emu_helpers import emu, needs_emu, route_ops_to_emulator
from helpers import MODEL_ANCHOR, cached_logits, model_stream, tiny_model

pytestmark = needs_emu

ANCHOR = MODEL_ANCHOR


def tiny_llama(seed=0):
    return tiny_model("llama", seed, max_position_embeddings=256)


def single_pass(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.fixture
def patched_model():
    import anllm_ext

    model = anllm_ext.patch(tiny_llama(), ANCHOR)
    yield model
    anllm_ext.unpatch(model)


def launches():
    return emu().emu_stats()[0]


def test_cached_decode_equals_one_masked_pass(patched_model, monkeypatch):
    ids, mask = model_stream(1, 44, seed=1)
    cpu_ref = single_pass(patched_model, ids, mask)  # the CPU kernels
    emu().emu_set_seed(11)
    route_ops_to_emulator(monkeypatch.setattr)
    before = launches()
    ref = single_pass(patched_model, ids, mask)
    assert launches() > before, "the patched model did not reach the emulated kernels"
    torch.testing.assert_close(ref, cpu_ref, atol=2e-5, rtol=1e-5)
    got, cache = cached_logits(patched_model, ids, mask, n_prompt=34, chunk=9)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert cache.lengths()[0] < 44  # closed segments were dropped (emulated compaction)
    assert any("plan_kernel" in line for line in emu().emu_launch_log(False))


def test_padded_batch_equals_rows_alone(patched_model, monkeypatch):
    emu().emu_set_seed(12)
    route_ops_to_emulator(monkeypatch.setattr)
    ids, mask = model_stream(3, 36, seed=3, left_pad=(4, 0, 9))
    batched, cache = cached_logits(patched_model, ids, mask, n_prompt=26, chunk=6)
    ref = single_pass(patched_model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(batched[keep], ref[keep], atol=2e-5, rtol=1e-5)
    for b in range(3):
        n = int((mask[b] == 0).sum())
        alone, _ = cached_logits(patched_model, ids[b:b + 1, n:], None, n_prompt=26 - n, chunk=6)
        torch.testing.assert_close(batched[b, n:], alone[0], atol=2e-5, rtol=1e-5)
        assert bool(cache.kept_layout(b).valid.all())  # padding never enters the kept cache


def test_gradients_through_emulated_backward(patched_model, monkeypatch):
    ids, mask = model_stream(2, 40, seed=4, left_pad=(0, 6))
    keep = mask.bool()

    def grads():
        patched_model.zero_grad()
        logits = patched_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits[keep].float() ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in patched_model.named_parameters() if "self_attn" in n}

    cpu = grads()
    emu().emu_set_seed(13)
    route_ops_to_emulator(monkeypatch.setattr)
    before = launches()
    got = grads()
    log = emu().emu_launch_log(False)
    assert launches() > before and any("launch_bwd" in line for line in log), log[-5:]
    for name, g in cpu.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)
