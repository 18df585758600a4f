"""Canonical, length-limited Huffman coding of integer symbols, vectorised in numpy.

Code lengths come from package-merge (optimal under a maximum length, so the decoder's lookup
table stays at 2**max_length entries). Codes are canonical: the lengths alone define them, so a
coded stream stores one length per symbol, not the code words.

Encoding scatters each symbol's code bits with one vectorised step per bit position. Decoding reads
every bit position's window through the lookup table at once, then finds the chain of code starts
from position 0 by pointer doubling: O(n log n) work, all in numpy, no Python loop over symbols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Longest code allowed. The decoder table has 2**MAX_LENGTH entries (64 Ki).
MAX_LENGTH = 16


def code_lengths(counts: np.ndarray, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Optimal code length per symbol (0 for unused symbols) with no code longer than ``max_length``.

    Package-merge (Larmore & Hirschberg 1990): the loops run over distinct symbols and lengths,
    never over coded values.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used] = 1  # one symbol still needs one bit per value to count them
        return lengths
    if len(used) > 2**max_length:
        raise ValueError(f"{len(used)} symbols cannot be coded with at most {max_length} bits")
    leaves = sorted((int(counts[s]), (int(s),)) for s in used)
    current: list[tuple[int, tuple[int, ...]]] = list(leaves)
    for _ in range(max_length - 1):
        packages = [(current[i][0] + current[i + 1][0], current[i][1] + current[i + 1][1]) for i in range(0, len(current) - 1, 2)]
        current = sorted(leaves + packages)
    # The first 2(n-1) items of the final list: each appearance of a symbol adds one to its length.
    chosen = [s for _, symbols in current[: 2 * (len(used) - 1)] for s in symbols]
    np.add.at(lengths, np.asarray(chosen, dtype=np.int64), 1)
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Code value per symbol for canonical Huffman codes of the given lengths (shorter first, then by symbol)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code, previous = 0, int(lengths[order[0]]) if len(order) else 0
    for i, symbol in enumerate(order):  # one step per distinct symbol
        length = int(lengths[symbol])
        if i:
            code = (code + 1) << (length - previous)
        codes[symbol] = code
        previous = length
    return codes


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical code: ``lengths[s]`` bits for symbol ``s`` (0: symbol absent)."""

    lengths: np.ndarray

    @classmethod
    def fit(cls, symbols: np.ndarray, alphabet: int, max_length: int = MAX_LENGTH) -> HuffmanCode:
        return cls(code_lengths(np.bincount(np.asarray(symbols, dtype=np.int64).ravel(), minlength=alphabet), max_length))

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def coded_bits(self, symbols: np.ndarray) -> int:
        """Bits the coded stream of ``symbols`` takes (without the table)."""
        return int(self.lengths[np.asarray(symbols, dtype=np.int64).ravel()].sum())

    def table_bits(self) -> int:
        """Bits to store the code: one 5-bit length per symbol of the alphabet."""
        return 5 * len(self.lengths)

    def encode(self, symbols: np.ndarray) -> tuple[bytes, int]:
        """(packed bitstream, number of bits) of ``symbols``, most significant bit first."""
        symbols = np.asarray(symbols, dtype=np.int64).ravel()
        if len(symbols) and np.any(self.lengths[symbols] == 0):
            raise ValueError("a symbol has no code (it was absent when the code was fitted)")
        codes = canonical_codes(self.lengths)[symbols]
        lengths = self.lengths[symbols]
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(symbols) else np.zeros(0, np.int64)
        total = int(lengths.sum())
        bits = np.zeros(total, dtype=np.uint8)
        for j in range(self.max_length):  # one vectorised step per bit position of a code
            has = lengths > j
            bits[starts[has] + j] = (codes[has] >> (lengths[has] - 1 - j)) & 1
        return np.packbits(bits).tobytes(), total

    def decode(self, data: bytes, count: int, total_bits: int) -> np.ndarray:
        """The ``count`` symbols coded in the first ``total_bits`` bits of ``data``."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        longest = self.max_length
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        if len(bits) < total_bits:
            raise ValueError("the bitstream is shorter than its declared length")
        bits = np.concatenate([bits[:total_bits], np.zeros(longest, dtype=np.uint8)]).astype(np.int64)
        # The `longest`-bit window starting at every bit position, as an integer (one shifted add
        # per bit of the window).
        windows = np.zeros(total_bits, dtype=np.int64)
        for j in range(longest):
            windows |= bits[j : j + total_bits] << (longest - 1 - j)
        # Lookup table: every window value whose prefix is a code word -> (symbol, length).
        table_symbol = np.full(1 << longest, -1, dtype=np.int64)
        table_length = np.zeros(1 << longest, dtype=np.int64)
        codes = canonical_codes(self.lengths)
        for symbol in np.flatnonzero(self.lengths):  # one slice per distinct symbol
            length = int(self.lengths[symbol])
            first = int(codes[symbol]) << (longest - length)
            table_symbol[first : first + (1 << (longest - length))] = symbol
            table_length[first : first + (1 << (longest - length))] = length
        symbol_at = table_symbol[windows]
        # Code starts: the orbit of 0 under p -> p + length(p), by pointer doubling. After round k
        # `starts` holds the first 2**k starts and `hop` jumps 2**k codes ahead; positions past the
        # end fall into the absorbing `end` state.
        end = total_bits
        hop = np.append(np.minimum(np.arange(total_bits) + np.maximum(table_length[windows], 1), end), end)
        starts = np.zeros(1, dtype=np.int64)
        while len(starts) < count:
            ahead = hop[starts]
            ahead = ahead[ahead < end]
            if len(ahead) == 0:
                break
            starts = np.concatenate([starts, ahead])
            hop = hop[hop]
        starts = starts[:count]
        if len(starts) < count or np.any(symbol_at[starts] < 0):
            raise ValueError("the bitstream does not decode to the declared number of symbols")
        return symbol_at[starts]
