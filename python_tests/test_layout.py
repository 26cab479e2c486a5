import pytest
import torch

import anllm_ext
from anllm_ext import LayoutStart, token_layout

from helpers import ANCHOR, token_stream


def test_layout_by_hand():
    ids = torch.tensor([[5, 1, 7, 8, 1, 9], [0, 0, 4, 1, 1, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    lay = token_layout(ids, [1], mask)
    assert lay.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    # seg(t) = anchors strictly before t; an anchor closes its own segment.
    assert lay.segments.tolist()[0] == [0, 0, 1, 1, 1, 2]
    assert lay.segments.tolist()[1][2:] == [0, 0, 1, 2]
    assert lay.is_anchor.tolist() == [[False, True, False, False, True, False],
                                      [False, False, False, True, True, False]]
    assert lay.valid.tolist()[1] == [False, False, True, True, True, True]
    assert lay.positions.dtype == torch.int64 and lay.segments.dtype == torch.int32
    nxt = lay.next_start()
    assert nxt.position.tolist() == [6, 4] and nxt.segment.tolist() == [2, 2]


def test_padding_token_equal_to_anchor_is_not_an_anchor():
    ids = torch.tensor([[1, 1, 3]])
    lay = token_layout(ids, [1], torch.tensor([[0, 1, 1]]))
    assert lay.is_anchor.tolist() == [[False, True, False]]
    assert lay.segments.tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("padding", ["none", "left", "right", "mixed"])
@pytest.mark.parametrize("cuts", [[1], [17, 18], [5, 40, 41, 90], list(range(1, 100, 7))])
def test_chunked_layout_equals_one_piece(padding, cuts):
    ids, mask = token_stream(3, 100, "random", padding)
    whole = token_layout(ids, [ANCHOR], mask)
    start, parts = None, []
    for lo, hi in zip([0] + cuts, cuts + [100]):
        part = token_layout(ids[:, lo:hi], [ANCHOR], mask[:, lo:hi], start=start)
        start = part.next_start()
        parts.append(part)
    joined = anllm_ext.Layout.cat(parts)
    valid = whole.valid
    assert torch.equal(joined.valid, valid)
    assert torch.equal(joined.is_anchor, whole.is_anchor)
    assert torch.equal(joined.positions[valid], whole.positions[valid])
    assert torch.equal(joined.segments[valid], whole.segments[valid])
    assert torch.equal(start.position, whole.next_start().position)
    assert torch.equal(start.segment, whole.next_start().segment)


def test_start_accepts_ints_and_tensors():
    ids = torch.tensor([[3, 1, 3]])
    a = token_layout(ids, 1, start=(10, 4))
    b = token_layout(ids, torch.tensor([1]), start=LayoutStart(torch.tensor([10]), torch.tensor([4])))
    assert a.positions.tolist() == [[10, 11, 12]] == b.positions.tolist()
    assert a.segments.tolist() == [[4, 4, 5]] == b.segments.tolist()


def test_layout_is_vectorised_for_long_inputs():
    ids, mask = token_stream(4, 20000, "random", "left")
    lay = token_layout(ids, [ANCHOR], mask)
    assert lay.positions[:, -1].tolist() == (mask.sum(1) - 1).tolist()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(input_ids=torch.zeros(3, dtype=torch.long)), "2-D"),
        (dict(input_ids=torch.zeros(2, 3)), "integer"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "shape"),
    ],
)
def test_bad_layout_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        token_layout(anchor_ids=[1], **bad)


def test_large_anchor_sets_agree_with_small_path():
    ids = torch.randint(0, 1000, (3, 200))
    many = list(range(0, 1000, 3))  # > 256 ids: the isin path
    lay = token_layout(ids, many)
    assert torch.equal(lay.is_anchor, (ids % 3 == 0))
    few = [5, 17, 999]
    assert torch.equal(token_layout(ids, few).is_anchor, torch.isin(ids, torch.tensor(few)))
