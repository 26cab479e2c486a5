"""The token ids of the step vLLM's model runner is preparing, for the AnSAN layouts.

vLLM's attention metadata carries no token ids; its model runner keeps them in the persistent input batch
(``input_batch.token_ids_cpu``: prompt + generated tokens of every running request, one row per request
in the order of the step's attention metadata). :func:`install` wraps ``GPUModelRunner._prepare_inputs``
(the CPU runner inherits it) so the batch of the step being prepared is at hand when the metadata builder
runs. Installed only when the anchor backend is selected, so a plain model's runner is untouched.
"""
from __future__ import annotations

import functools
import threading

_local = threading.local()
_installed = False


def install() -> None:
    """Wrap the model runner's ``_prepare_inputs`` (once per process)."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs

    @functools.wraps(original)
    def _prepare_inputs(self, *args, **kwargs):
        _local.input_batch = self.input_batch
        return original(self, *args, **kwargs)

    GPUModelRunner._prepare_inputs = _prepare_inputs
    _installed = True


def token_ids(num_reqs: int, length: int):
    """``token_ids_cpu[:num_reqs, :length]`` of the step being prepared (a numpy view), or None outside a
    step (vLLM's dummy and profiling runs)."""
    batch = getattr(_local, "input_batch", None)
    if batch is None or batch.num_reqs != num_reqs:
        return None
    return batch.token_ids_cpu[:num_reqs, :length]
