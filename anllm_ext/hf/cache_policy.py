"""Which caches a patched model runs with (:func:`check_cache`, the one decision), and the keyword that
passes a cache to a model (:func:`cache_kwarg`)."""
from __future__ import annotations

import inspect

from ..cache import AnchorCache
from ..errors import UnsupportedError

# The caches a patched model runs exactly with (one place for the decision: check_cache and
# check_cache_implementation). transformers' "offloaded" is a DynamicCache too (it needs a GPU).
SUPPORTED_CACHE_IMPLEMENTATIONS = (None, "dynamic", "offloaded")


def cache_kwarg(module) -> str:
    """Name of the keyword that takes the KV cache in ``module.forward`` (and ``generate``): ``"cache"``
    (transformers >= 5.24) or ``"past_key_values"`` (earlier 5.x releases)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def check_cache(cache) -> None:
    """The caches a patched model runs exactly with: an :class:`AnchorCache`, or transformers' ``DynamicCache``
    of full-attention layers (what ``cache_implementation="dynamic"`` and a direct forward with
    ``use_cache=True`` create; the patch remembers its tokens' layout). Any other cache raises
    :class:`UnsupportedError`: a ``StaticCache`` (``cache_implementation="static"``) hands the attention all
    its preallocated slots, which carry no anchor layout; quantized and sliding-window caches change or
    drop keys the AnSAN mask needs."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if isinstance(cache, AnchorCache):
        return
    layer_types = {type(layer) for layer in getattr(cache, "layers", [])}
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is not None:
        layer_types.add(replicate)
    if type(cache) is DynamicCache and layer_types <= {DynamicLayer}:
        return
    layers = f" of {', '.join(sorted(t.__name__ for t in layer_types))}" if layer_types else ""
    raise _unsupported_cache(f"got a {type(cache).__name__}{layers}")


def full_attention_cache(default):
    """The full cache a patched model runs with where transformers made ``default`` itself (no cache given):
    ``default`` when :func:`check_cache` accepts it; a ``DynamicCache`` of full-attention layers in place of the
    sliding-window ``DynamicCache`` transformers makes for a model with a configured sliding window (the AnSAN
    mask replaces the window: docs/transformers.md). Any other cache raises as :func:`check_cache` does."""
    from transformers.cache_utils import DynamicCache

    try:
        check_cache(default)
        return default
    except UnsupportedError:
        if type(default) is not DynamicCache:
            raise
    return DynamicCache(offloading=bool(getattr(default, "offloading", False)))


def check_cache_implementation(name) -> None:
    """``generate``'s ``cache_implementation``: only those of :data:`SUPPORTED_CACHE_IMPLEMENTATIONS`."""
    if name not in SUPPORTED_CACHE_IMPLEMENTATIONS:
        raise _unsupported_cache(f"got cache_implementation={name!r}")


def _unsupported_cache(what: str) -> UnsupportedError:
    return UnsupportedError(
        f"a patched model supports only an AnchorCache or a DynamicCache of full-attention layers ({what}): static, "
        "quantized and sliding-window caches do not keep every key with its anchor layout (and torch.compile of the "
        "decode step, what a static cache is for, is not supported). Use model.generate() without a cache (an "
        "AnchorCache), cache=AnchorCache(model.config), or cache_implementation='dynamic' (the full cache)"
    )
