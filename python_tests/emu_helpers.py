"""Loading of the CUDA emulator extension (csrc/emu/, built by `make test-cuda-emu`) for the test_cuda_emu*
tests: the CUDA kernels of csrc/cuda/ running on the CPU under an emulation of CUDA's execution model.
Also used by tools/fuzz_ops.py --emu (route_ops_to_emulator)."""
import os

import pytest
import torch

LIB = os.environ.get("ANLLM_CUDA_EMU_LIB", "")
LOADED = False
if LIB and os.path.exists(LIB):
    torch.ops.load_library(LIB)
    LOADED = True

needs_emu = pytest.mark.skipif(
    not LOADED,
    reason="the CUDA emulator extension is not loaded: `make test-cuda-emu` builds it (build/cuda_emu) and runs "
    "these tests with ANLLM_CUDA_EMU_LIB set" + (f" ({LIB} does not exist)" if LIB else ""),
)

SEEDS = [0, 1, 2]  # schedules (thread interleavings and block orders) the main cases run under


def emu():
    return torch.ops.anllm_cuda_emu


def parts(layout):
    return (layout.positions, layout.segments, layout.is_anchor, layout.valid)


# anllm_ext.ops calls the operators through these module globals (the overloads, bound at import).
ROUTED = {
    "_attention_fwd": "anchor_attention_fwd",
    "_attention_bwd": "anchor_attention_bwd",
    "_compact": "compact_",
    "_append_attention": "anchor_attention_append_",
}
_autograd_registered = False


def route_ops_to_emulator(setattr_fn=setattr):
    """Makes anllm_ext's op wrappers (anchor_attention[_with_lse], its autograd backward,
    anchor_attention_append_, compact_kv_, compact_slots_) call the emulated CUDA kernels on CPU tensors:
    what every op call of a patched transformers model or an AnchorCache reaches on a GPU, here under the
    emulator. token_layout is not routed: on a GPU it is ATen ops (anllm_ext/layout.py), not a kernel.

    ``setattr_fn``: ``monkeypatch.setattr`` in tests (undone after the test); plain setattr otherwise.
    Returns the replaced originals ({name: op})."""
    global _autograd_registered
    from anllm_ext import ops

    if not _autograd_registered:
        # the same autograd formula as torch.ops.anllm's (ops.py); its backward calls ops._attention_bwd,
        # which is routed too, so gradients run the emulated backward kernels
        torch.library.register_autograd("anllm_cuda_emu::anchor_attention_fwd", ops._attention_backward,
                                        setup_context=ops._attention_setup_context)
        _autograd_registered = True
    saved = {}
    for attr, op in ROUTED.items():
        saved[attr] = getattr(ops, attr)
        setattr_fn(ops, attr, getattr(emu(), op).default)
    return saved
