"""Megatron's indexed-dataset format (``.bin`` + ``.idx``), written without importing
``megatron.core``.

Importing ``megatron.core`` (torch and its compiler stack) takes seconds, more than tokenizing a
few MB; preprocessing only needs the file format, which is small and stable: the ``.idx`` is a
9-byte magic, version 1 (``<Q``), the dtype code (``<B``), the sequence and document counts
(``<Q`` each), then sequence lengths (int32), byte pointers (int64) and document indices (int64).
The bytes are those of ``IndexedDatasetBuilder.finalize`` (tests compare the two), and
Megatron's ``IndexedDataset`` reads them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
               np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
               np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """The token dtype Megatron picks for a vocabulary (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def write_index(path: str | Path, dtype: type, sequence_lengths: np.ndarray,
                document_indices: np.ndarray) -> None:
    """Write ``path`` (.idx) for sequences of ``sequence_lengths`` tokens of ``dtype``;
    ``document_indices`` starts with 0 and ends with the number of sequences."""
    dtype = np.dtype(dtype)
    if dtype not in DTYPE_CODES:
        raise ValueError(f"{path}: dtype {dtype} has no code in Megatron's index format")
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: a sequence length does not fit the index's int32")
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", lengths.size))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(lengths.astype(np.int32).tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes(order="C"))
