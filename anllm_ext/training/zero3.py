"""DeepSpeed ZeRO-3: parameters gathered whole on demand, models loaded whole on one rank."""
from __future__ import annotations

import contextlib

from transformers.integrations import is_deepspeed_zero3_enabled


def full_parameters(model):
    """Under DeepSpeed ZeRO-3 each rank holds a slice of every parameter: gather them whole for the
    duration (a collective, every rank enters it). A no-op otherwise."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


@contextlib.contextmanager
def zero3_init_off(training_args):
    """Load a model whole on one rank: transformers would otherwise create it partitioned (ZeRO-3's
    ``zero.Init``), a collective the other ranks never join."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)
