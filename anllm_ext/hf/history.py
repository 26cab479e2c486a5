"""The token layout of every token held by a non-anchor transformers cache (``DynamicCache`` etc.) that a
patched model filled, so that later forwards with the same cache object still see the exact mask.

Keyed weakly by the cache; each entry holds the layout and a fingerprint of the cache's layer-0 keys that
tells whether transformers reordered / selected / cropped its rows since (beam search does).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ..layout import Layout

_HISTORY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Tracked:
    """Layout of the tokens a non-anchor cache holds, plus the fingerprint of its keys."""

    __slots__ = ("layout", "fingerprint")

    def __init__(self, layout, fingerprint):
        self.layout, self.fingerprint = layout, fingerprint


def _fingerprint(cache):
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else None
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        return None
    return keys[:, 0, :, :2].detach().clone()  # [B, T, 2]: first KV head, two channels, every token


def remember(cache, layout: Layout) -> None:
    """Record ``layout`` as the layout of every token ``cache`` holds (after a forward of the patched model)."""
    _HISTORY[cache] = _Tracked(layout, _fingerprint(cache))


def history_of(cache) -> Optional[Layout]:
    """The layout of the tokens ``cache`` holds (None when the patched model never filled it), following the
    rows when transformers reordered, selected or cropped them since; a cache changed in another way raises."""
    tracked = _HISTORY.get(cache)
    if tracked is None:
        return None
    now = _fingerprint(cache)
    old = tracked.fingerprint
    if now is None or old is None:
        return tracked.layout
    if now.shape == old.shape and torch.equal(now, old):
        return tracked.layout
    # rows were reordered / selected (beam search) and/or the cache was cropped: find each new row's source
    Bn, Tn = now.shape[:2]
    if Tn > old.shape[1]:
        raise RuntimeError(f"{type(cache).__name__} changed outside the patched model; its anchor layout is unknown")
    same = (now.reshape(Bn, 1, -1) == old[:, :Tn].reshape(1, old.shape[0], -1)).all(-1)  # [Bn, Bold]
    if not bool(same.any(-1).all()):
        raise RuntimeError(f"{type(cache).__name__} changed outside the patched model; its anchor layout is unknown")
    src = same.to(torch.int8).argmax(-1).to(tracked.layout.positions.device)
    layout = tracked.layout[src][:, :Tn]
    tracked.layout, tracked.fingerprint = layout, now
    return layout
