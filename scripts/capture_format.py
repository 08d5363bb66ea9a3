"""Writer for hysparse capture format v1 (HDF5), shared by the capture and conversion scripts.

The contract is README.md, "Capture format v1 (HDF5)". This module needs NumPy and h5py only (NumPy 1.x
or 2.x). A capture is written to `PATH.partial` and renamed into place when `close()` succeeds, so an
interrupted capture never leaves a file that looks complete.

    with CaptureWriter(path, model="m", source="...", num_layers=2, num_q_heads=8, num_kv_heads=4,
                       head_dim=16, seq_len=T, softmax_scale=0.25) as w:
        w.write_layer(0, q=q0, k=k0, v=v0)          # whole arrays, or head by head:
        w.write_head(1, "q", h, q1h) ...            # [T, head_dim] slices, bounded host memory
        w.write_tokens(ids); w.write_text(text)

Element types: float32 (default), float16, or bfloat16 stored as uint16 with the dataset attribute
dtype = "bfloat16" (round to nearest even). Every tensor is checked for NaN/Inf before it is written.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

FORMAT = "hysparse-capture"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

# Exit codes, as the hysparse CLI uses them.
EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT = 1, 2, 3, 4


class CaptureError(Exception):
    """A problem with the input or the request; `code` is the exit code the scripts end with."""

    def __init__(self, message: str, code: int = EXIT_INPUT):
        super().__init__(message)
        self.code = code


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of float32 values, rounded to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def read_tensor(dataset) -> np.ndarray:
    """A capture dataset as float32, decoding bfloat16 (uint16 with attribute dtype="bfloat16")."""
    data = dataset[...]
    tag = dataset.attrs.get("dtype", None)
    if isinstance(tag, bytes):
        tag = tag.decode()
    if data.dtype == np.uint16 and tag == "bfloat16":
        return bfloat16_bits_to_float32(data)
    return data.astype(np.float32)


def parse_layer_list(spec: Optional[str], num_layers: int) -> List[int]:
    """'all' / None, or '0,2,5-7' (ranges inclusive, negative indices from the end) -> sorted unique list."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(num_layers))
    chosen = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise CaptureError(f"--layers: cannot parse '{part}' (expected e.g. 0,2,5-7 or all)", EXIT_USAGE)
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        a = a + num_layers if a < 0 else a
        b = b + num_layers if b < 0 else b
        if not (0 <= a <= b < num_layers):
            raise CaptureError(f"--layers: '{part}' is outside 0..{num_layers - 1}", EXIT_USAGE)
        chosen.update(range(a, b + 1))
    return sorted(chosen)


class CaptureWriter:
    """Writes one v1 capture, layer by layer (or head by head), then renames it into place."""

    def __init__(self, path: str, *, model: str, source: str, num_layers: int, num_q_heads: int,
                 num_kv_heads: int, head_dim: int, seq_len: int, softmax_scale: Optional[float] = None,
                 layer_types: Optional[Sequence[str]] = None, sliding_window: Optional[int] = None,
                 dtype: str = "float32", compression: Optional[str] = None,
                 extra_attrs: Optional[Dict[str, object]] = None):
        import h5py  # imported here so that `--help` works without h5py

        self._h5py = h5py
        for name, value in (("num_layers", num_layers), ("num_q_heads", num_q_heads),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("seq_len", seq_len)):
            if int(value) <= 0:
                raise CaptureError(f"{name} = {value} (expected a positive integer)")
        if num_q_heads % num_kv_heads:
            raise CaptureError(f"num_q_heads = {num_q_heads} is not a multiple of num_kv_heads = {num_kv_heads}")
        if dtype not in DTYPES:
            raise CaptureError(f"dtype '{dtype}' (expected one of {', '.join(DTYPES)})", EXIT_USAGE)
        if softmax_scale is not None and not (np.isfinite(softmax_scale) and softmax_scale > 0):
            raise CaptureError(f"softmax_scale = {softmax_scale} (expected a finite positive number)")
        if layer_types is not None:
            layer_types = list(layer_types)
            if len(layer_types) != num_layers:
                raise CaptureError(f"{len(layer_types)} layer types for {num_layers} layers")
            for t in layer_types:
                if t not in LAYER_TYPES:
                    raise CaptureError(f"layer type '{t}' (expected one of {', '.join(LAYER_TYPES)})")
        if sliding_window is not None and int(sliding_window) <= 0:
            raise CaptureError(f"sliding_window = {sliding_window} (expected a positive integer)")
        self.path = path
        self.num_layers, self.num_q_heads, self.num_kv_heads = int(num_layers), int(num_q_heads), int(num_kv_heads)
        self.head_dim, self.seq_len = int(head_dim), int(seq_len)
        self.dtype = dtype
        self.compression = compression
        self._written: Dict[int, set] = {i: set() for i in range(self.num_layers)}
        self._heads_left: Dict[tuple, set] = {}
        self._tmp = path + ".partial"
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise CaptureError(f"{path}: output folder {directory} does not exist", EXIT_OUTPUT)
        try:
            self._file = h5py.File(self._tmp, "w")
        except OSError as e:
            raise CaptureError(f"{path}: cannot create ({e})", EXIT_OUTPUT) from e
        a = self._file.attrs
        string = h5py.string_dtype()
        a.create("format", FORMAT, dtype=string)
        a["format_version"] = np.int64(FORMAT_VERSION)
        a.create("model", str(model), dtype=string)
        a.create("source", str(source), dtype=string)
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "seq_len"):
            a[name] = np.int64(getattr(self, name))
        if softmax_scale is not None:
            a["softmax_scale"] = np.float64(softmax_scale)
        if layer_types is not None:
            a.create("layer_types", layer_types, dtype=string)
        if sliding_window is not None:
            a["sliding_window"] = np.int64(sliding_window)
        for name, value in (extra_attrs or {}).items():
            if isinstance(value, str):
                a.create(name, value, dtype=string)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(x, str) for x in value):
                a.create(name, list(value), dtype=string)
            else:
                a[name] = value
        self._file.create_group("layers")

    def set_layer_types(self, layer_types: Sequence[str], sliding_window: Optional[int]) -> None:
        """Sets (or replaces) layer_types and sliding_window, for writers that learn them while capturing."""
        types = list(layer_types)
        if len(types) != self.num_layers or any(t not in LAYER_TYPES for t in types):
            raise CaptureError(f"layer types {types} (expected {self.num_layers} of {', '.join(LAYER_TYPES)})",
                               EXIT_INTERNAL)
        if sliding_window is not None and int(sliding_window) <= 0:
            raise CaptureError(f"sliding_window = {sliding_window} (expected a positive integer)")
        a = self._file.attrs
        for name in ("layer_types", "sliding_window"):
            if name in a:
                del a[name]
        a.create("layer_types", types, dtype=self._h5py.string_dtype())
        if sliding_window is not None:
            a["sliding_window"] = np.int64(sliding_window)

    # -- tensors -----------------------------------------------------------------------------------------

    def _shape(self, name: str) -> tuple:
        T, d = self.seq_len, self.head_dim
        return {"q": (self.num_q_heads, T, d), "k": (self.num_kv_heads, T, d), "v": (self.num_kv_heads, T, d),
                "attn": (self.num_q_heads, T, T), "sink_logits": (self.num_q_heads,)}[name]

    def _storage(self, name: str):
        if name == "sink_logits" or self.dtype == "float32":
            return np.float32
        return np.float16 if self.dtype == "float16" else np.uint16

    def _encode(self, name: str, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data)
        if not np.all(np.isfinite(data)):
            raise CaptureError(f"{name}: holds NaN or Inf values (the capture would be rejected)")
        if name == "sink_logits" or self.dtype == "float32":
            return np.ascontiguousarray(data, dtype=np.float32)
        if self.dtype == "float16":
            out = data.astype(np.float16)
            if not np.all(np.isfinite(out)):
                raise CaptureError(f"{name}: values overflow float16 (max |x| = {np.abs(data).max():.4g}); "
                                   "use --dtype bfloat16 or float32")
            return out
        return float32_to_bfloat16_bits(data)

    def _dataset(self, layer: int, name: str):
        path = f"layers/{layer}/{name}"
        if path in self._file:
            return self._file[path]
        shape = self._shape(name)
        kwargs = {}
        if name != "sink_logits":
            rows = min(shape[1], max(1, (1 << 20) // (4 * shape[2])))  # about 1 MiB chunks, one head each
            kwargs["chunks"] = (1, rows, shape[2])
            if self.compression:
                kwargs["compression"] = self.compression
        ds = self._file.create_dataset(path, shape=shape, dtype=self._storage(name), **kwargs)
        if self._storage(name) == np.uint16:
            ds.attrs.create("dtype", "bfloat16", dtype=self._h5py.string_dtype())
        return ds

    def _check_layer(self, layer: int, name: str) -> None:
        if not (0 <= layer < self.num_layers):
            raise CaptureError(f"layer {layer} outside 0..{self.num_layers - 1}", EXIT_INTERNAL)
        if name not in ("q", "k", "v", "attn", "sink_logits"):
            raise CaptureError(f"unknown layer dataset '{name}'", EXIT_INTERNAL)
        if name in self._written[layer]:
            raise CaptureError(f"layer {layer}: '{name}' written twice", EXIT_INTERNAL)

    def write(self, layer: int, name: str, data: np.ndarray) -> None:
        """One whole dataset of a layer: q, k, v, attn or sink_logits."""
        self._check_layer(layer, name)
        data = np.asarray(data)
        shape = self._shape(name)
        if tuple(data.shape) != shape:
            raise CaptureError(f"layer {layer}: {name} has shape {list(data.shape)} (expected {list(shape)})")
        encoded = self._encode(f"layer {layer} {name}", data)
        ds = self._dataset(layer, name)
        if name == "sink_logits":
            ds[...] = encoded
        else:
            for h in range(shape[0]):  # one head at a time keeps conversion buffers small
                ds[h] = encoded[h]
        self._written[layer].add(name)

    def write_head(self, layer: int, name: str, head: int, data: np.ndarray) -> None:
        """One head [seq_len, head_dim] (or [seq_len, seq_len] for attn); the dataset counts as written
        once all of its heads are."""
        if name in self._written.get(layer, ()):
            raise CaptureError(f"layer {layer}: '{name}' written twice", EXIT_INTERNAL)
        shape = self._shape(name)
        key = (layer, name)
        if key not in self._heads_left:
            self._check_layer(layer, name)
            self._heads_left[key] = set(range(shape[0]))
        if head not in self._heads_left[key]:
            raise CaptureError(f"layer {layer}: {name} head {head} written twice or out of range", EXIT_INTERNAL)
        data = np.asarray(data)
        if tuple(data.shape) != shape[1:]:
            raise CaptureError(f"layer {layer}: {name} head {head} has shape {list(data.shape)} "
                               f"(expected {list(shape[1:])})")
        self._dataset(layer, name)[head] = self._encode(f"layer {layer} {name} head {head}", data)
        self._heads_left[key].discard(head)
        if not self._heads_left[key]:
            del self._heads_left[key]
            self._written[layer].add(name)

    def write_layer(self, layer: int, q=None, k=None, v=None, sink_logits=None, attn=None) -> None:
        for name, data in (("q", q), ("k", k), ("v", v), ("sink_logits", sink_logits), ("attn", attn)):
            if data is not None:
                self.write(layer, name, data)
        self._file.flush()

    def write_tokens(self, tokens: Iterable[int]) -> None:
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.shape != (self.seq_len,):
            raise CaptureError(f"/tokens has {ids.size} ids (expected seq_len = {self.seq_len})", EXIT_INTERNAL)
        if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
            raise CaptureError("/tokens: ids outside the int32 range")
        self._file.create_dataset("tokens", data=ids.astype(np.int32))

    def write_text(self, text: str) -> None:
        self._file.create_dataset("text", data=str(text), dtype=self._h5py.string_dtype())

    # -- completion ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Checks that every layer holds q and k (v optional) or attn, then renames the file into place."""
        for layer, names in self._written.items():
            if not (("q" in names and "k" in names) or "attn" in names):
                self.abort()
                raise CaptureError(f"layer {layer} was not captured (holds {sorted(names) or 'nothing'}; "
                                   "expected q and k, or attn)", EXIT_INTERNAL)
        self._file.close()
        try:
            os.replace(self._tmp, self.path)
        except OSError as e:
            raise CaptureError(f"{self.path}: cannot rename into place ({e})", EXIT_OUTPUT) from e

    def abort(self) -> None:
        try:
            self._file.close()
        except Exception:
            pass
        try:
            os.remove(self._tmp)
        except OSError:
            pass

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
