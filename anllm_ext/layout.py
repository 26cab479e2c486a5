"""Per-token layout of an anchor-segmented token stream (see docs/method.md).

A :class:`Layout` holds, for every token of a [B, T] batch, its true absolute position, its segment id,
whether it is an anchor and whether it is a real token (not padding). The attention kernels evaluate
the AnSAN mask rule from two layouts (queries and keys), so keys can be a compacted cache followed by
new tokens.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch

from .config import check_sink

AnchorIds = Union[int, Sequence[int], torch.Tensor]


class LayoutStart(NamedTuple):
    """Where a chunk starts: the next absolute position and the next segment id of every row."""

    position: torch.Tensor  # int64 [B]
    segment: torch.Tensor  # int64 [B]


@dataclass(frozen=True)
class Layout:
    positions: torch.Tensor  # int64 [B, T], true absolute positions (0 for padding)
    segments: torch.Tensor  # int32 [B, T], number of anchors strictly before the token
    is_anchor: torch.Tensor  # bool [B, T]
    valid: torch.Tensor  # bool [B, T], False for padding
    # What token_layout's kernel computed along the way (None when the layout was built otherwise):
    # the next chunk's start and a 0-d bool "some row holds an anchor or padding".
    _next: Optional[LayoutStart] = field(default=None, compare=False, repr=False)
    _boundary: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> torch.Size:
        return self.positions.shape

    def has_boundary(self) -> bool:
        """Whether some row holds an anchor or padding (a cache that appended this chunk has slots to drop)."""
        if self._boundary is not None:
            return bool(self._boundary)
        return bool((self.is_anchor | ~self.valid).any())

    def next_start(self) -> LayoutStart:
        """The start of the chunk that follows this one (see ``token_layout(start=...)``)."""
        if self._next is not None:
            return self._next
        if self.shape[1] == 0:
            raise ValueError("next_start() of an empty layout is undefined; keep the previous start")
        # The first token of a row always carries the row's start position and segment (padding
        # included), so the next start is that plus the real tokens and anchors of this chunk.
        next_pos = self.positions[:, 0] + self.valid.sum(dim=1)
        next_seg = self.segments[:, 0].to(torch.int64) + self.is_anchor.sum(dim=1)
        return LayoutStart(next_pos, next_seg)

    def to(self, device: Union[str, torch.device]) -> "Layout":
        return Layout(*(t.to(device) for t in self.as_tuple()))

    def as_tuple(self):
        return (self.positions, self.segments, self.is_anchor, self.valid)

    def __getitem__(self, index) -> "Layout":
        """Index rows and/or tokens, e.g. ``layout[:, 3:7]`` or ``layout[[0, 2]]``."""
        return Layout(*(t[index] for t in self.as_tuple()))

    @staticmethod
    def cat(layouts: Iterable["Layout"], dim: int = 1) -> "Layout":
        layouts = list(layouts)
        return Layout(*(torch.cat(parts, dim=dim) for parts in zip(*(l.as_tuple() for l in layouts))))


def anchor_tensor(anchor_ids: AnchorIds, device=None) -> torch.Tensor:
    """Anchor ids as a 1-D int64 tensor (accepts an int, a sequence of ints or an integer tensor); anything else
    raises ``TypeError`` naming ``anchor_ids``."""
    if isinstance(anchor_ids, torch.Tensor):
        if anchor_ids.dtype.is_floating_point or anchor_ids.dtype.is_complex or anchor_ids.dtype == torch.bool:
            raise TypeError(f"anchor_ids must hold integer token ids, got a {anchor_ids.dtype} tensor")
        if anchor_ids.dim() == 1 and anchor_ids.dtype == torch.int64 and (device is None or anchor_ids.device == device):
            return anchor_ids
        return anchor_ids.reshape(-1).to(device=device, dtype=torch.int64)
    items = [anchor_ids] if isinstance(anchor_ids, numbers.Integral) else anchor_ids
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"anchor_ids must be an int, a sequence of ints or an integer tensor, got {_describe(items)}")
    return torch.tensor([_token_id(i) for i in items], dtype=torch.int64, device=device)


def _token_id(item) -> int:
    """One anchor id: a Python or numpy integer, or a 0-d integer tensor (what iterating a tensor gives)."""
    if isinstance(item, torch.Tensor):
        if item.dim() != 0 or item.dtype.is_floating_point or item.dtype.is_complex or item.dtype == torch.bool:
            raise TypeError(f"anchor_ids must hold integer token ids, got {item!r}")
        return int(item)
    if isinstance(item, bool) or not isinstance(item, numbers.Integral):
        raise TypeError(f"anchor_ids must hold integer token ids, got {item!r}")
    return int(item)


def token_layout(
    input_ids: torch.Tensor,
    anchor_ids: AnchorIds,
    attention_mask: Optional[torch.Tensor] = None,
    start: Optional[Union[LayoutStart, tuple]] = None,
    sink: int = 0,
) -> Layout:
    """Layout of a [B, T] batch of token ids.

    ``attention_mask`` (1 = token, 0 = padding; left or right padding, or holes) makes positions
    padding-aware: the n-th real token of a row has position ``start.position + n``. ``start`` carries
    the state of earlier chunks of the same rows (``Layout.next_start()``), so a text cut into chunks
    gets exactly the layout of the text in one piece. ``sink``: the real tokens at positions below it are
    anchors too, whatever their ids (an attention sink every later token reads and a cache keeps; docs/method.md).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D [batch, tokens] tensor, got {_describe(input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    check_sink(sink)
    if device.type == "cpu":  # the one per-device choice: the CPU kernel, ATen ops elsewhere
        start_pos, start_seg = _start_tensors(start, B, device)
        if not sink or not bool((start_pos < sink).any()):  # no sink token in this chunk: the kernel's rule
            *parts, next_pos, next_seg, boundary = torch.ops.anllm.token_layout.default(
                input_ids, anchor_tensor(anchor_ids, device), attention_mask, start_pos, start_seg
            )
            return Layout(*parts, _next=LayoutStart(next_pos, next_seg), _boundary=boundary)
    return _token_layout_aten(input_ids, anchor_ids, attention_mask, start, sink)


def _token_layout_aten(input_ids, anchor_ids, attention_mask=None, start=None, sink: int = 0) -> Layout:
    """token_layout as ATen ops (devices without the layout kernel; the tests compare the two)."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.to(device=device) != 0
    start_pos, start_seg = _start_tensors(start, B, device)

    if T == 1:  # a decode step: the general formula reduces to the row's start (padding included)
        positions = start_pos[:, None]
    else:
        positions = start_pos[:, None] + torch.cumsum(valid.to(torch.int64), dim=1) - 1
        # Padding gets the row's start position: harmless (it is invisible) and keeps next_start() simple.
        positions = torch.where(valid, positions, start_pos[:, None])
    is_anchor = _is_anchor(input_ids, anchor_tensor(anchor_ids, device))
    if sink:
        is_anchor = is_anchor | (positions < sink)
    is_anchor = is_anchor & valid
    if T == 1:
        return Layout(positions, start_seg[:, None].to(torch.int32), is_anchor, valid)
    anchors_int = is_anchor.to(torch.int64)
    segments = start_seg[:, None] + torch.cumsum(anchors_int, dim=1) - anchors_int
    return Layout(positions, segments.to(torch.int32), is_anchor, valid)


def _is_anchor(input_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    # torch.isin costs ~0.2 ms even for one token (a decode step calls this once); a broadcast compare
    # against the few anchor ids an AnLLM uses is far cheaper.
    if anchors.numel() <= 256:
        return (input_ids[..., None] == anchors).any(dim=-1)
    return torch.isin(input_ids, anchors)


def _start_tensors(start, batch: int, device):
    if start is None:
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        return zeros, zeros
    pos, seg = start
    if (
        isinstance(pos, torch.Tensor)
        and isinstance(seg, torch.Tensor)
        and pos.dtype == seg.dtype == torch.int64
        and pos.shape == (batch,) == seg.shape
        and pos.device == device == seg.device
    ):
        return pos, seg  # next_start() of the previous chunk: int64 [B] already
    pos = torch.as_tensor(pos, dtype=torch.int64, device=device).expand(batch).contiguous()
    seg = torch.as_tensor(seg, dtype=torch.int64, device=device).expand(batch).contiguous()
    return pos, seg


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
