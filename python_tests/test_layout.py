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


def test_long_inputs_equal_the_oracle():
    from anllm_ext.reference import token_layout_ref

    ids, mask = token_stream(4, 20000, "random", "mixed")
    lay, ref = token_layout(ids, [ANCHOR], mask), token_layout_ref(ids, [ANCHOR], mask)
    for name in ("positions", "segments", "is_anchor", "valid"):
        assert torch.equal(getattr(lay, name), getattr(ref, name)), name


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


@pytest.mark.parametrize("anchor_ids", [None, "13", 1.5, [1, 2.0], [True], torch.tensor([1.0]), torch.tensor([True]),
                                       [torch.tensor(1.0)], [torch.tensor([1, 2])]])
def test_bad_anchor_ids_name_the_argument(anchor_ids):
    with pytest.raises(TypeError, match="anchor_ids"):
        token_layout(torch.zeros(1, 3, dtype=torch.long), anchor_ids)


def test_anchor_ids_of_any_integer_kind_give_one_layout():
    import numpy as np

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = token_layout(ids, [1, 9])
    for same in ([np.int64(1), 9], (1, 9), torch.tensor([[1], [9]], dtype=torch.int32), list(torch.tensor([1, 9]))):
        assert torch.equal(token_layout(ids, same).segments, ref.segments)


def test_large_anchor_sets_agree_with_small_path():
    ids = torch.randint(0, 1000, (3, 200))
    many = list(range(0, 1000, 3))  # > 256 ids: the isin path
    lay = token_layout(ids, many)
    assert torch.equal(lay.is_anchor, (ids % 3 == 0))
    few = [5, 17, 999]
    assert torch.equal(token_layout(ids, few).is_anchor, torch.isin(ids, torch.tensor(few)))


def _implementations(ids, anchors, mask, start):
    """Both production layouts: the ATen formulation (non-CPU devices) and the CPU kernel."""
    from anllm_ext.layout import _token_layout_aten

    return {"aten": _token_layout_aten(ids, anchors, mask, start), "cpu-kernel": token_layout(ids, anchors, mask, start)}


@pytest.mark.parametrize("T", [1, 2, 63, 65, 1100])
@pytest.mark.parametrize("pattern", ["random", "at_zero", "consecutive", "all", "none"])
@pytest.mark.parametrize("padding", ["none", "left", "right", "mixed"])
def test_both_layout_implementations_equal_the_per_token_oracle(T, pattern, padding):
    """CPU inputs go through the token_layout kernel; other devices through ATen ops. Each must equal the
    per-token loop of the rule (reference.token_layout_ref), including the next start and the
    anchor-or-padding flag the kernel returns alongside."""
    from anllm_ext.reference import token_layout_ref

    g = torch.Generator().manual_seed(T * 31 + len(pattern) + len(padding))
    ids, mask = token_stream(3, T, pattern, padding, generator=g)
    start = LayoutStart(torch.randint(0, 5000, (3,), generator=g), torch.randint(0, 300, (3,), generator=g))
    for anchors, m in (([ANCHOR], mask), ([ANCHOR, 4, 9], mask.bool()), (list(range(1, 200, 3)), mask.int()), ([ANCHOR], None)):
        ref = token_layout_ref(ids, anchors, m, start)
        valid = ref.valid.sum(1)
        for impl, lay in _implementations(ids, anchors, m, start).items():
            for name in ("positions", "segments", "is_anchor", "valid"):
                a, b = getattr(ref, name), getattr(lay, name)
                assert a.dtype == b.dtype and torch.equal(a, b), f"{impl}: {name}"
            assert torch.equal(lay.next_start().position, start.position + valid), impl
            assert torch.equal(lay.next_start().segment, start.segment + ref.is_anchor.sum(1)), impl
            assert lay.has_boundary() == bool((ref.is_anchor | ~ref.valid).any()), impl


def test_oracle_by_hand():
    from anllm_ext.reference import token_layout_ref

    lay = token_layout_ref(torch.tensor([[0, 5, 1, 7, 1]]), [1], torch.tensor([[0, 1, 1, 1, 1]]), start=(10, 3))
    assert lay.positions.tolist() == [[10, 10, 11, 12, 13]]
    assert lay.segments.tolist() == [[3, 3, 3, 4, 4]]
    assert lay.is_anchor.tolist() == [[False, False, True, False, True]]


def test_kernel_layout_chains_chunks_and_defaults():
    ids = torch.tensor([[3, 1, 3, 3]])
    a = token_layout(ids[:, :2], 1)  # no start: position 0, segment 0
    b = token_layout(ids[:, 2:], 1, start=a.next_start())
    assert a.positions.tolist() == [[0, 1]] and b.positions.tolist() == [[2, 3]]
    assert b.segments.tolist() == [[1, 1]] and not b.has_boundary() and a.has_boundary()
    assert token_layout(torch.zeros(2, 0, dtype=torch.long), 1).positions.shape == (2, 0)


def test_layout_kernel_opcheck():
    ids, mask = token_stream(2, 40, "random", "mixed")
    args = (ids, torch.tensor([ANCHOR, 5]), mask, torch.tensor([3, 0]), torch.tensor([1, 0]))
    torch.library.opcheck(torch.ops.anllm.token_layout.default, args)
    torch.library.opcheck(torch.ops.anllm.token_layout.default, (ids, torch.tensor([ANCHOR]), None) + args[3:])


@pytest.mark.parametrize("change, match", [
    (dict(start_pos=torch.zeros(3, dtype=torch.long)), "start_pos must have shape"),
    (dict(start_seg=torch.zeros(2, dtype=torch.int32)), "start_seg must have dtype"),
    (dict(anchor_ids=torch.tensor([[1]])), "anchor_ids must be a 1-D"),
    (dict(attention_mask=torch.ones(2, 5)), "attention_mask must have the shape"),
    (dict(start_seg=torch.full((2,), 2**31 - 2)), "int32 range"),
])
def test_layout_kernel_bad_input(change, match):
    args = dict(input_ids=torch.ones(2, 4, dtype=torch.long), anchor_ids=torch.tensor([1]), attention_mask=None,
                start_pos=torch.zeros(2, dtype=torch.long), start_seg=torch.zeros(2, dtype=torch.long))
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.anllm.token_layout(*args.values())
