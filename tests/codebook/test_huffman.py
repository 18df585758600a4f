"""Huffman coding: optimal lengths (against a textbook heap Huffman), the length limit, exact
round trips, and corrupt streams refused."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from qcompiler.codebook.huffman import HuffmanCode, canonical_codes, code_lengths


def _heap_huffman_cost(counts: np.ndarray) -> int:
    """Total coded bits of an unrestricted Huffman code: the sum of all merge weights."""
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_lengths_are_optimal_when_the_limit_does_not_bind(seed: int) -> None:
    counts = np.random.default_rng(seed).integers(0, 1000, 40)
    lengths = code_lengths(counts)
    assert int((lengths * counts).sum()) == _heap_huffman_cost(counts)
    assert np.all((lengths > 0) == (counts > 0))
    assert np.isclose((2.0 ** -lengths[lengths > 0]).sum(), 1.0)  # a complete prefix code


def test_length_limit_holds_for_fibonacci_counts() -> None:
    fib = [1, 1]
    for _ in range(28):
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert _heap_huffman_cost(counts) < int((code_lengths(counts, 8) * counts).sum())  # the limit costs bits
    lengths = code_lengths(counts, 8)
    assert lengths.max() == 8 and (2.0 ** -lengths.astype(float)).sum() <= 1.0


def test_canonical_codes_are_prefix_free() -> None:
    lengths = code_lengths(np.random.default_rng(3).integers(1, 500, 30))
    codes = canonical_codes(lengths)
    words = {format(int(c), f"0{int(l)}b") for c, l in zip(codes, lengths)}
    assert len(words) == len(lengths)
    assert not any(a != b and b.startswith(a) for a in words for b in words)


@pytest.mark.parametrize(("alphabet", "count"), [(1, 7), (2, 1), (16, 10_000), (256, 200_000), (300, 5_000)])
def test_round_trip_is_exact_and_near_entropy(alphabet: int, count: int) -> None:
    rng = np.random.default_rng(alphabet)
    symbols = rng.choice(alphabet, count, p=rng.dirichlet(np.full(alphabet, 0.5)))
    code = HuffmanCode.fit(symbols, alphabet)
    data, bits = code.encode(symbols)
    assert bits == code.coded_bits(symbols) and len(data) == (bits + 7) // 8
    np.testing.assert_array_equal(code.decode(data, count, bits), symbols)
    p = np.bincount(symbols, minlength=alphabet) / count
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert entropy <= bits / count <= max(entropy, 0) + 1  # Huffman is within one bit of entropy


def test_truncated_stream_is_refused() -> None:
    symbols = np.random.default_rng(0).integers(0, 8, 1000)
    code = HuffmanCode.fit(symbols, 8)
    data, bits = code.encode(symbols)
    with pytest.raises(ValueError):
        code.decode(data[: len(data) // 2], len(symbols), bits)
    with pytest.raises(ValueError):
        code.decode(data, len(symbols) + 50, bits)  # more symbols than the stream holds
