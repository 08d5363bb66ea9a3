#!/usr/bin/env python3
"""Convert dense attention-probability maps (NumPy .npy / .npz) into a hysparse capture (format v1) whose
layers hold `attn` [num_q_heads, seq_len, seq_len] instead of q/k: mass metrics only, short contexts.

Accepted layouts (what people dump from `output_attentions=True`):
  .npy  [L, B, H, T, T]   e.g. np.save(f, torch.stack(out.attentions).float().cpu().numpy())  (--batch-index)
        [L, H, T, T]      layers x heads x queries x keys
        [H, T, T]         a single layer
  .npz  one array of any layout above (or the one named by --key), or one array per layer ([H, T, T],
        [1, H, T, T] or [B, H, T, T]) whose names end in the layer number (layer_0, attn_1, arr_2, ...).
        An integer array named `tokens` or `input_ids` becomes /tokens.

Every map is validated before anything is written: square [T, T] rows over keys, the same heads and length
in every layer, finite non-negative values, causal (mass on future keys <= --tol; it is then set to 0), and
each row's causal mass within --tol of 1 (--allow-partial-rows accepts rows below 1, e.g. attention sinks).
`--config config.json` (Hugging Face) supplies num_kv_heads, head_dim, layer_types and sliding_window;
otherwise num_kv_heads defaults to the head count and head_dim to 1 (placeholders: attn captures have no
q/k, so only the replay's KV table reads them).

Example:
  scripts/convert_attn.py attentions.npy -o maps.h5 --model my-model --config path/to/config.json
Exit codes: 0 ok, 2 usage, 3 bad input (the message names the array, layer, head and row), 4 output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from typing import List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capture_format import (EXIT_INPUT, EXIT_USAGE, CaptureError, CaptureWriter,  # noqa: E402
                            parse_layer_list)

TOKEN_KEYS = ("tokens", "input_ids")


def fail(message: str, code: int = EXIT_INPUT):
    raise CaptureError(message, code)


class LayerSource:
    """Yields one layer's maps [H, T, T] at a time from the input file, whatever its layout."""

    def __init__(self, path: str, key: Optional[str], batch_index: int):
        self.path, self.batch_index = path, batch_index
        self.tokens: Optional[np.ndarray] = None
        self._stack = None          # array [L, H, T, T] (possibly a view with a batch axis fixed)
        self._per_layer: List[Tuple[int, str]] = []
        self._npz = None
        try:
            if path.endswith(".npz"):
                self._npz = np.load(path, allow_pickle=False)
                keys = list(self._npz.files)
                for tk in TOKEN_KEYS:
                    if tk in keys and key != tk:
                        self.tokens = np.asarray(self._npz[tk]).reshape(-1)
                        keys.remove(tk)
                if key is not None:
                    if key not in self._npz.files:
                        fail(f"{path}: no array '{key}' (arrays: {', '.join(self._npz.files)})", EXIT_USAGE)
                    keys = [key]
                if not keys:
                    fail(f"{path}: no attention arrays")
                if len(keys) == 1:
                    self._set_stack(self._npz[keys[0]], f"{path}:{keys[0]}")
                else:
                    numbered = []
                    for k in keys:
                        m = re.search(r"(\d+)$", k)
                        if not m:
                            fail(f"{path}: array '{k}' has no layer number at the end of its name (expected one "
                                 "array per layer named e.g. layer_0, layer_1, ...; or pass --key)")
                        numbered.append((int(m.group(1)), k))
                    numbered.sort()
                    idx = [n for n, _ in numbered]
                    if len(set(idx)) != len(idx):
                        fail(f"{path}: two arrays share a layer number ({', '.join(keys)})")
                    self._per_layer = numbered
            else:
                self._set_stack(np.load(path, mmap_mode="r", allow_pickle=False), path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            fail(f"{path}: cannot read as NumPy .npy/.npz ({e})")

    def _set_stack(self, a: np.ndarray, name: str) -> None:
        if a.ndim == 5:
            if not (0 <= self.batch_index < a.shape[1]):
                fail(f"{name}: batch index {self.batch_index} outside 0..{a.shape[1] - 1} (shape {list(a.shape)})",
                     EXIT_USAGE)
            a = a[:, self.batch_index]
        elif a.ndim == 3:
            a = a[None]
        elif a.ndim != 4:
            fail(f"{name}: shape {list(a.shape)} (expected [layers, batch, heads, T, T], [layers, heads, T, T] "
                 "or [heads, T, T])")
        self._stack, self._name = a, name

    @property
    def num_layers(self) -> int:
        return self._stack.shape[0] if self._stack is not None else len(self._per_layer)

    def layer_name(self, i: int) -> str:
        if self._stack is not None:
            return f"{self._name} layer {i}"
        return f"{self.path}:{self._per_layer[i][1]}"

    def layer(self, i: int) -> np.ndarray:
        if self._stack is not None:
            return self._stack[i]
        a = self._npz[self._per_layer[i][1]]
        name = self.layer_name(i)
        if a.ndim == 4:
            if not (0 <= self.batch_index < a.shape[0]):
                fail(f"{name}: batch index {self.batch_index} outside 0..{a.shape[0] - 1} (shape {list(a.shape)})",
                     EXIT_USAGE)
            a = a[self.batch_index]
        elif a.ndim != 3:
            fail(f"{name}: shape {list(a.shape)} (expected [heads, T, T] or [batch, heads, T, T] per layer)")
        return a


def check_layer(a: np.ndarray, name: str, heads: int, T: int, tol: float, allow_partial: bool) -> np.ndarray:
    """Validates one layer's maps [H, T, T]; returns them as float32 with the future keys set to 0."""
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        fail(f"{name}: shape {list(a.shape)} (expected [heads, T, T] with square query x key maps)")
    if a.shape != (heads, T, T):
        fail(f"{name}: shape {list(a.shape)} differs from the first layer's {[heads, T, T]} "
             "(every layer needs the same heads and length)")
    if not np.issubdtype(a.dtype, np.floating):
        fail(f"{name}: element type {a.dtype} (expected floating-point probabilities)")
    out = np.empty((heads, T, T), np.float32)
    future = np.triu(np.ones((T, T), bool), k=1)
    for h in range(heads):
        p = np.asarray(a[h], dtype=np.float64)
        where = f"{name} head {h}"
        bad = ~np.isfinite(p)
        if bad.any():
            t, j = np.argwhere(bad)[0]
            fail(f"{where}: non-finite value at query {t}, key {j}")
        if p.min() < -tol:
            t, j = np.unravel_index(np.argmin(p), p.shape)
            fail(f"{where}: negative probability {p[t, j]:.3g} at query {t}, key {j} (expected softmax output)")
        fut = np.where(future, p, 0.0).sum(axis=1)
        if fut.max() > tol:
            t = int(np.argmax(fut))
            fail(f"{where}: not causal: query {t} puts {fut[t]:.3g} of its mass on later keys (expected <= {tol}; "
                 "maps must be [queries, keys] of a causal model)")
        p = np.where(future, 0.0, np.maximum(p, 0.0))
        rows = p.sum(axis=1)
        if rows.max() > 1 + tol:
            t = int(np.argmax(rows))
            fail(f"{where}: row {t} sums to {rows[t]:.6g} (expected probabilities summing to 1 within {tol})")
        if rows.min() <= 0:
            t = int(np.argmin(rows))
            fail(f"{where}: row {t} has no mass on keys 0..{t}")
        if not allow_partial and rows.min() < 1 - tol:
            t = int(np.argmin(rows))
            fail(f"{where}: row {t} sums to {rows[t]:.6g} (expected 1 within {tol}; pass --allow-partial-rows "
                 "if mass went to attention sinks)")
        out[h] = p
    return out


def shape_from_config(path: str, num_layers: int, heads: int) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read ({e})", EXIT_USAGE)
    cfg = cfg.get("text_config", cfg) if "num_attention_heads" not in cfg else cfg
    out = {}
    if cfg.get("num_attention_heads") not in (None, heads):
        fail(f"{path}: num_attention_heads = {cfg['num_attention_heads']} but the maps have {heads} heads")
    if cfg.get("num_hidden_layers") not in (None, num_layers):
        print(f"convert_attn: note: {path} has {cfg['num_hidden_layers']} layers, the maps {num_layers}",
              file=sys.stderr)
    if cfg.get("num_key_value_heads"):
        out["num_kv_heads"] = int(cfg["num_key_value_heads"])
    hd = cfg.get("head_dim") or (cfg["hidden_size"] // heads if cfg.get("hidden_size") else None)
    if hd:
        out["head_dim"] = int(hd)
    types = cfg.get("layer_types")
    if types is not None and len(types) == num_layers:
        out["layer_types"] = [t for t in types]
        if "sliding_attention" in types and cfg.get("sliding_window"):
            out["sliding_window"] = int(cfg["sliding_window"])
    return out


def convert(args) -> str:
    src = LayerSource(args.input, args.key, args.batch_index)
    n_in = src.num_layers
    if n_in == 0:
        fail(f"{args.input}: no layers")
    layers = parse_layer_list(args.layers, n_in)
    first = src.layer(layers[0])
    if first.ndim != 3 or first.shape[1] != first.shape[2]:
        fail(f"{src.layer_name(layers[0])}: shape {list(first.shape)} (expected [heads, T, T])")
    heads, T = int(first.shape[0]), int(first.shape[1])
    shape = shape_from_config(args.config, n_in, heads) if args.config else {}
    if args.num_kv_heads:
        shape["num_kv_heads"] = args.num_kv_heads
    if args.head_dim:
        shape["head_dim"] = args.head_dim
    kv = shape.get("num_kv_heads", heads)
    if heads % kv:
        fail(f"{heads} heads is not a multiple of num_kv_heads = {kv}", EXIT_USAGE)
    types = shape.get("layer_types")
    tokens = None
    if args.tokens is not None:
        tokens = np.asarray([int(x) for x in re.split(r"[\s,]+", args.tokens.strip()) if x])
    elif src.tokens is not None:
        tokens = src.tokens
    if tokens is not None and tokens.shape != (T,):
        fail(f"{tokens.size} tokens for maps of length {T}")
    text = args.text
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    source = f"scripts/convert_attn.py {os.path.abspath(args.input)}" + (f" (batch {args.batch_index})" if args.batch_index else "")
    with CaptureWriter(args.output, model=args.model or os.path.splitext(os.path.basename(args.input))[0],
                       source=source, num_layers=len(layers), num_q_heads=heads, num_kv_heads=kv,
                       head_dim=shape.get("head_dim", 1), seq_len=T,
                       layer_types=[types[i] for i in layers] if types else None,
                       sliding_window=shape.get("sliding_window") if types and any(
                           types[i] == "sliding_attention" for i in layers) else None,
                       dtype=args.dtype, compression="gzip" if args.gzip else None,
                       extra_attrs={"source_layers": np.asarray(layers, dtype=np.int64)}) as w:
        for slot, i in enumerate(layers):
            a = first if slot == 0 else src.layer(i)
            w.write(slot, "attn", check_layer(a, src.layer_name(i), heads, T, args.tol, args.allow_partial_rows))
        if tokens is not None:
            w.write_tokens(tokens)
        if text:
            w.write_text(text)
    return f"wrote {args.output} ({len(layers)} layers, {heads} heads, seq_len {T}, attn maps, {args.dtype})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help=".npy or .npz file of attention probabilities")
    ap.add_argument("-o", "--output", required=True, help="capture file to write (HDF5, format v1)")
    ap.add_argument("--key", help="the array to read from a .npz holding several")
    ap.add_argument("--batch-index", type=int, default=0, help="batch row to take from [L, B, H, T, T] input (0)")
    ap.add_argument("--layers", default="all", help="layers to keep: all, or e.g. 0,2,5-7 (all)")
    ap.add_argument("--model", help="model name stored in the capture (default: the input's file name)")
    ap.add_argument("--config", help="Hugging Face config.json: num_kv_heads, head_dim, layer_types, sliding_window")
    ap.add_argument("--num-kv-heads", type=int, help="KV heads (default: config, else the head count)")
    ap.add_argument("--head-dim", type=int, help="head dimension (default: config, else 1 as a placeholder)")
    ap.add_argument("--tokens", help="token ids, comma or space separated (default: the .npz's tokens array)")
    ap.add_argument("--text", help="text stored as /text")
    ap.add_argument("--text-file", help="read /text from a file")
    ap.add_argument("--tol", type=float, default=1e-2,
                    help="tolerance for row sums and mass on future keys (1e-2, enough for bfloat16 dumps)")
    ap.add_argument("--allow-partial-rows", action="store_true",
                    help="accept rows whose causal mass is below 1 (attention sinks, dropped mass)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="element type stored (float32)")
    ap.add_argument("--gzip", action="store_true", help="gzip-compress the datasets")
    args = ap.parse_args(argv)
    try:
        if args.tol < 0 or args.batch_index < 0:
            fail("--tol and --batch-index must be non-negative", EXIT_USAGE)
        print(convert(args))
        return 0
    except CaptureError as e:
        print(f"convert_attn: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
