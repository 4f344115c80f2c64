"""trec.data.csr: the one CSR type and its (row, column) keys, against plain Python references."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from trec.data import Csr, key_rows, pair_key

NUM_COLUMNS = 7


@pytest.fixture
def csr() -> Csr:
    """30 rows (some empty) of sorted unique values below NUM_COLUMNS."""
    rng = np.random.default_rng(0)
    rows = [np.sort(rng.choice(NUM_COLUMNS, rng.integers(0, 5), replace=False)) for _ in range(30)]
    offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    return Csr(offsets, np.concatenate(rows).astype(np.int64))


def _rows(csr: Csr) -> list[list[int]]:
    return [csr.values[csr.offsets[r] : csr.offsets[r + 1]].tolist() for r in range(len(csr.offsets) - 1)]


def test_rows_pairs_and_keys_match_a_python_reference(csr):
    plain = _rows(csr)
    assert csr.num_rows == 30 and csr.lengths.tolist() == [len(r) for r in plain]
    assert [csr.row(r).tolist() for r in range(30)] == plain
    index = np.random.default_rng(1).integers(-1, 30, 50)  # -1: an empty row
    picked = [[] if r < 0 else plain[r] for r in index]
    lengths, values = csr.rows(index)
    assert lengths.tolist() == [len(p) for p in picked] and values.tolist() == sum(picked, [])
    positions, values = csr.pairs(index)
    assert list(zip(positions.tolist(), values.tolist())) == [(i, v) for i, p in enumerate(picked) for v in p]
    assert csr.keys(index, NUM_COLUMNS).tolist() == sorted(i * NUM_COLUMNS + v for i, p in enumerate(picked) for v in p)
    every = sorted(r * NUM_COLUMNS + v for r, p in enumerate(plain) for v in p)
    assert csr.all_keys(NUM_COLUMNS).tolist() == every
    back = Csr.from_keys(csr.all_keys(NUM_COLUMNS), csr.num_rows, NUM_COLUMNS)
    assert np.array_equal(back.offsets, csr.offsets) and np.array_equal(back.values, csr.values)


def test_last_keeps_the_newest_values_without_the_excluded_one(csr):
    rng = np.random.default_rng(2)
    index, exclude = rng.integers(-1, 30, 60), rng.integers(0, NUM_COLUMNS, 60)
    plain = _rows(csr)
    for max_len in (0, 1, 3):
        lengths, values = csr.last(index, max_len)
        expected = [[] if r < 0 else plain[r][len(plain[r]) - min(len(plain[r]), max_len):] for r in index]
        assert lengths.tolist() == [len(e) for e in expected] and values.tolist() == sum(expected, [])
        lengths, values = csr.last(index, max_len, exclude)
        expected = []
        for r, target in zip(index, exclude):
            window = [] if r < 0 else plain[r][len(plain[r]) - min(len(plain[r]), max_len + 1):]
            kept = [v for v in window if v != target]
            expected.append(kept[len(kept) - min(len(kept), max_len):])
        assert lengths.tolist() == [len(e) for e in expected] and values.tolist() == sum(expected, [])


def test_numpy_and_torch_keys_agree():
    rows, columns = np.array([0, 3, 3, 9]), np.array([6, 0, 5, 2])
    keys = pair_key(rows, columns, NUM_COLUMNS)
    tensor_keys = pair_key(torch.as_tensor(rows), torch.as_tensor(columns), NUM_COLUMNS)
    assert tensor_keys.tolist() == keys.tolist() == [6, 21, 26, 65]
    assert key_rows(keys, NUM_COLUMNS).tolist() == key_rows(tensor_keys, NUM_COLUMNS).tolist() == rows.tolist()


def test_from_arrow_drops_missing_elements_and_null_lists():
    column = pa.array([[3, -1, 4], None, [], [-1], [5]], pa.list_(pa.int64()))
    csr = Csr.from_arrow(pa.chunked_array([column]))
    assert csr.offsets.tolist() == [0, 2, 2, 2, 2, 3] and csr.values.tolist() == [3, 4, 5]
