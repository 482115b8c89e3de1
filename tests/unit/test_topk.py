"""StreamingTopK (thresholds estimated from samples, exact regardless) against a plain torch.topk; keeping
every column (AllColumns) against the row itself."""

import pytest
import torch

from npeff_tl.pefs.topk import AllColumns, StreamingTopK, row_selection, sort_descending


def _oracle(pieces, k, key):
    row = torch.cat(pieces, dim=1)
    top = key(row).topk(k, dim=1)
    return row.gather(1, top.indices), top.indices


def _streamed(pieces, k, key):
    top = StreamingTopK(pieces[0].shape[0], k, sum(p.shape[1] for p in pieces), key=key)
    offset = 0
    for piece in pieces:
        top.add(piece.clone(), offset)
        piece.fill_(float("nan"))  # the caller may reuse the memory: the selection must not depend on it
        offset += piece.shape[1]
    return top.result()


def _rows(seed, widths, kind):
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for i, n in enumerate(widths):
        x = torch.randn(5, n, generator=g)
        if kind == "heavy-tailed":
            x = x * torch.rand(5, n, generator=g).pow(-3)
        elif kind == "later-pieces-larger":  # every later piece displaces the whole earlier selection
            x = x * 10.0**i
        elif kind == "sparse":  # mostly exact zeros: fewer non-zeros than k in some rows
            x = x * (torch.rand(5, n, generator=g) < 0.001)
        elif kind == "skewed":  # a cluster of large values a random sample misses
            x[:, :50] += 100.0
        pieces.append(x)
    return pieces


def test_a_few_entries_from_pieces_too_small_to_sample():
    for k in (1, 2, 5):  # pieces over 4 k entries but with fewer sampled entries than the estimate needs
        pieces = _rows(k, [6, 25, 31, 33, 200], "normal")
        values, indices = _streamed([p.clone() for p in pieces], k, torch.abs)
        want_values, want_indices = _oracle(pieces, k, torch.abs)
        assert torch.equal(values, want_values) and torch.equal(indices, want_indices)


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed", "later-pieces-larger", "sparse", "skewed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_top_k_is_exact(kind, seed):
    k = 300
    pieces = _rows(seed, [40_000, 100, 7, 25_000], kind)
    for key in (torch.square, torch.abs, None):  # None: the values are the keys (non-negative rows)
        if key is None:
            pieces, key = [p.abs() for p in pieces], None
        want_values, want_indices = _oracle(pieces, k, key or (lambda x: x))
        values, indices = _streamed([p.clone() for p in pieces], k, key)
        key = key or (lambda x: x)
        assert torch.equal(key(values), key(want_values))  # same keys in the same (descending) order
        if kind != "sparse":  # no ties: the same entries too
            assert torch.equal(indices, want_indices)
        row = torch.cat(pieces, dim=1)
        assert torch.equal(values, row.gather(1, indices))  # every value sits at its index


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed", "later-pieces-larger", "sparse", "skewed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_pieces_give_the_exact_top_k_from_candidates_of_their_bound(kind, seed):
    """LRM-PEFs: the classes of one parameter tensor offered at once (class c at joint column c * size + j), their
    candidates found from sum_c u_c^2; against a plain topk of the joint row."""
    g, k, widths = 3, 300, [40_000, 100, 7, 25_000]
    size = sum(widths)
    classes = [_rows(seed + 10 * c, widths, kind) for c in range(g)]  # classes[c][t]: [5, widths[t]]
    row = torch.cat([torch.cat(pieces, dim=1) for pieces in classes], dim=1)
    want = row.abs().topk(k, dim=1)
    top = StreamingTopK(5, k, g * size, key=torch.abs)
    start = 0
    for t, n in enumerate(widths):
        values = torch.stack([classes[c][t] for c in range(g)], dim=1)  # [5, g, n]
        top.add_group(values.clone(), [c * size + start for c in range(g)], values.square().sum(1))
        start += n
    values, indices = top.result()
    assert torch.equal(values.abs(), want.values)  # same keys in the same (descending) order
    if kind != "sparse":  # no ties: the same entries too
        assert torch.equal(indices, want.indices)
    assert torch.equal(values, row.gather(1, indices))


@pytest.mark.parametrize("key", [torch.square, None])
def test_keeping_everything_sorts_the_whole_row(key):
    pieces = [p.abs() for p in _rows(3, [700, 300], "normal")]
    pieces[1][:, :50] = 0.0  # ties: kept in column order
    values, indices = _streamed([p.clone() for p in pieces], 1000, key)
    row = torch.cat(pieces, dim=1)
    keys = row.square() if key else row
    assert torch.equal(torch.sort(indices, dim=1).values, torch.arange(1000).expand(5, -1))
    assert torch.equal(values, row.gather(1, indices))
    assert torch.equal(keys.gather(1, indices), keys.sort(dim=1, descending=True, stable=True).values)
    assert torch.equal(indices[:, -50:], torch.arange(700, 750).expand(5, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 70_000])  # torch sorts long integer rows with a different (radix) kernel
def test_descending_order_matches_a_comparison_sort(dtype, n):
    keys = torch.rand(4, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    keys[:, ::7] = 0.0
    keys[0, 3] = float("inf")
    values, order = sort_descending(keys)
    want = keys.sort(dim=1, descending=True, stable=True)
    assert torch.equal(values, want.values)
    assert torch.equal(order, want.indices)  # ties (the zeros) in column order
    assert torch.equal(order.sort(dim=1).values, torch.arange(n).expand(4, -1))


def test_keeping_every_column_gives_the_row_in_column_order_without_sorting():
    pieces = _rows(4, [700, 5, 300], "normal")
    selection = row_selection(5, 1005, 1005, key=torch.abs)
    assert isinstance(selection, AllColumns) and isinstance(row_selection(5, 1004, 1005), StreamingTopK)
    for piece, offset in reversed(list(zip(pieces, (0, 700, 705)))):  # pieces may come in any order
        selection.add(piece.clone(), offset)
    values, indices = selection.result()
    assert torch.equal(values, torch.cat(pieces, dim=1)) and torch.equal(indices, torch.arange(1005).expand(5, -1))
    short = AllColumns(5, 1005)
    short.add(pieces[0], 0)
    with pytest.raises(RuntimeError, match="keeping all 1005 columns, but 700 were added"):
        short.result()


def test_more_than_total_is_an_error():
    for make in (StreamingTopK, row_selection):
        with pytest.raises(ValueError, match="cannot keep 11 of 10 entries"):
            make(2, 11, 10)
