"""GGUF plumbing shared by the exporters: copy key/values, read tensors, stream-write files.

Files are written tensor by tensor (header first, then each tensor as it is
computed), so exporting a model holds one tensor in memory at a time, into a
temp file that `cope_local.paths.atomic_path` renames into place only after
the last byte is written.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cope_local.errors import CopeError
from cope_local.gguf_file import GGUFHeader
from cope_local.paths import atomic_path

OUTTYPES = ("f32", "f16", "q8_0")

_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_DTYPE = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
             7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


def decode_raw(vtype: int, data: bytes):
    """(value, sub_type) from a value's stored bytes, in the form GGUFWriter.add_key_value takes."""
    if vtype in _SCALAR_FMT:
        return struct.unpack_from("<" + _SCALAR_FMT[vtype], data, 0)[0], None
    if vtype == 8:
        n = struct.unpack_from("<Q", data, 0)[0]
        try:
            return data[8:8 + n].decode("utf-8"), None
        except UnicodeDecodeError:
            return data[8:8 + n], None  # GGUFWriter writes bytes as they are
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", data, 0)
        body = data[12:]
        if etype in _NP_DTYPE:
            arr = np.frombuffer(body, dtype=np.dtype(_NP_DTYPE[etype]).newbyteorder("<"), count=count)
            return arr.tolist(), etype
        if etype == 8:
            out, pos = [], 0
            for _ in range(count):
                n = struct.unpack_from("<Q", body, pos)[0]
                out.append(body[pos + 8:pos + 8 + n])  # bytes: tokens need not be valid UTF-8
                pos += 8 + n
            return out, etype
        raise CopeError(f"nested GGUF arrays are not supported (element type {etype})")
    raise CopeError(f"unknown GGUF value type {vtype}")


def copy_kv(writer, header: GGUFHeader, *, skip: Callable[[str], bool]) -> None:
    """Copy every key/value of `header` not skipped, with its stored type."""
    import gguf

    for key, (vtype, data) in header.raw.items():
        if key == "general.architecture" or skip(key):
            continue
        val, sub = decode_raw(vtype, data)
        if vtype == 9 and not val:
            continue  # GGUFWriter refuses empty arrays; llama.cpp treats them as absent
        writer.add_key_value(key, val, gguf.GGUFValueType(vtype), sub_type=gguf.GGUFValueType(sub) if sub is not None else None)


class TensorSource:
    """Read-only, mmapped tensor data of a GGUF file, dequantized on demand to float32."""

    def __init__(self, header: GGUFHeader):
        self.header = header
        self._f = open(header.path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        self._mm.close()
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def f32(self, name: str) -> np.ndarray:
        """(ne_{n-1}, ..., ne0) float32 copy of one tensor."""
        import gguf

        t = self.header.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        shape = tuple(reversed(t.shape))  # numpy order
        if qtype == gguf.GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape).copy()
        if qtype == gguf.GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(shape).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.BF16:
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        try:
            return gguf.quants.dequantize(raw.reshape(byte_shape), qtype).astype(np.float32, copy=False)
        except NotImplementedError:
            raise CopeError(f"{self.header.path}: tensor {name} has type {qtype.name}, which cannot be dequantized here; use an F16/F32/Q4/Q5/Q6/Q8 file") from None


def out_qtype(shape: tuple, outtype: str, name: str = ""):
    """GGML type for one output tensor (numpy-order shape): 1-D and odd-width rows stay precise."""
    import gguf

    T = gguf.GGMLQuantizationType
    if outtype not in OUTTYPES:
        raise CopeError(f"unknown --outtype {outtype!r}; use one of: {', '.join(OUTTYPES)}")
    if len(shape) <= 1 or outtype == "f32" or name.startswith("rope_freqs"):
        return T.F32
    if outtype == "f16":
        return T.F16
    return T.Q8_0 if shape[-1] % 32 == 0 else T.F16  # Q8_0 blocks are 32 wide (LoRA B rows are r wide)


def encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple  # numpy order (rows last = ne0)
    qtype: object  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]  # returns float32 data of `shape`


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    return n // block * type_size


def write_gguf(out: str | os.PathLike, arch: str, kv: Callable, tensors: Iterable[PlannedTensor],
               *, check: Callable[[Path], None] | None = None, mode: int = 0o644) -> Path:
    """Stream a GGUF to `out` atomically.

    kv(writer) adds the key/values; each tensor's `produce()` runs once, in
    order, while the file is written. `check(tmp_path)` may inspect the finished
    temp file and raise to abort (the destination is then left untouched).
    """
    import gguf

    tensors = list(tensors)
    out = Path(out)
    with atomic_path(out, mode=mode) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            kv(writer)
            for t in tensors:
                nbytes = _nbytes(t.shape, t.qtype)
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = t.produce()
                if tuple(data.shape) != tuple(t.shape):
                    raise CopeError(f"internal error: tensor {t.name} has shape {data.shape}, planned {t.shape}")
                writer.write_tensor_data(encode(data, t.qtype))
            writer.flush()
        finally:
            writer.close()
        if check is not None:
            check(tmp)
    return out
