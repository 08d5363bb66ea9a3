#!/usr/bin/env python3
"""Capture post-RoPE Q/K/V from a small Llama-family checkpoint with NumPy only (no PyTorch), as a
hysparse capture (format v1).

Checkpoints:
  * a Hugging Face folder: config.json + model.safetensors (or sharded, with model.safetensors.index.json),
    model_type llama, mistral, qwen2 or qwen3 (F32/F16/BF16 tensors; RoPE default, linear or llama3;
    sliding windows from layer_types / sliding_window; q/k/v biases; Qwen3 q/k norms);
  * a llama2.c checkpoint (.bin): the legacy format (7 int32 header) or export version 1 ("ak42" magic).

The sequence is BOS + the prompt (token ids, or text when the tokenizer is a SentencePiece-style BPE:
llama2.c tokenizer.bin / tok512.bin, or tokenizer.json with a Metaspace/Prepend normalizer), optionally
repeated to --repeat-to tokens, then optionally extended by --generate N greedy tokens. With no prompt at
all, the model generates greedily from BOS up to --seq-len tokens. One prefill over the whole sequence
then records q (post-RoPE, exactly what the softmax sees), k and v (stored once per KV head) and writes
them layer by layer. Attention is computed in query tiles, so no T x T matrix is held.

Examples:
  scripts/capture_llama.py ../shared/models/stories260K/stories260K.bin -o s260k.h5 --seq-len 256
  scripts/capture_llama.py ../shared/models/TinyStories-656K -o ts656k.h5 --prompt "Once upon a time" \
      --generate 200
Exit codes: 0 ok, 2 usage, 3 bad or unsupported input, 4 output not writable, 1 internal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capture_format import (EXIT_INPUT, EXIT_USAGE, CaptureError, CaptureWriter,  # noqa: E402
                            bfloat16_bits_to_float32, parse_layer_list)

LLAMA2C_MAGIC = 0x616B3432
SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# ----------------------------------------------------------------------------------------------------------
# Model description
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str
    checkpoint_format: str          # "hf-safetensors", "llama2c-legacy", "llama2c-v1"
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_style: str                 # "half" (HF rotate_half) or "interleaved" (llama2.c / Meta pairs)
    inv_freq: np.ndarray            # float32 [head_dim/2]
    rope_theta: float
    softmax_scale: float
    layer_types: List[str]
    sliding_window: Optional[int]
    bos_id: int = 1
    eos_id: Optional[int] = 2
    max_positions: int = 0
    qk_norm: bool = False

    def window_of(self, layer: int) -> Optional[int]:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq_t: np.ndarray                # [dim, Hq*d] (transposed: x @ w)
    wk_t: np.ndarray
    wv_t: np.ndarray
    wo_t: np.ndarray
    ffn_norm: np.ndarray
    w1_t: np.ndarray                # gate
    w2_t: np.ndarray                # down
    w3_t: np.ndarray                # up
    bq: Optional[np.ndarray] = None
    bk: Optional[np.ndarray] = None
    bv: Optional[np.ndarray] = None
    q_norm: Optional[np.ndarray] = None
    k_norm: Optional[np.ndarray] = None


@dataclass
class Weights:
    embed: np.ndarray               # [vocab, dim]
    final_norm: np.ndarray
    lm_head: np.ndarray             # [vocab, dim]
    layers: List[LayerWeights] = field(default_factory=list)


def fail(message: str, code: int = EXIT_INPUT):
    raise CaptureError(message, code)


# ----------------------------------------------------------------------------------------------------------
# safetensors with NumPy only
# ----------------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": np.dtype("<u2")}


class SafeTensors:
    """Reads tensors from one or more .safetensors files (8-byte header length, JSON header, raw data)."""

    def __init__(self, files: Sequence[str]):
        self.index: Dict[str, tuple] = {}
        self.aliases: Dict[str, str] = {}
        for path in files:
            try:
                size = os.path.getsize(path)
                with open(path, "rb") as f:
                    raw = f.read(8)
                    if len(raw) != 8:
                        fail(f"{path}: truncated safetensors file (no header length)")
                    (n,) = struct.unpack("<Q", raw)
                    if n <= 0 or 8 + n > size:
                        fail(f"{path}: safetensors header length {n} does not fit in a {size}-byte file")
                    header = json.loads(f.read(n).decode("utf-8"))
            except (OSError, ValueError) as e:
                fail(f"{path}: cannot read safetensors header ({e})")
            meta = header.pop("__metadata__", None) or {}
            for name, info in header.items():
                begin, end = info["data_offsets"]
                if 8 + n + end > size:
                    fail(f"{path}: tensor {name} ends at byte {8 + n + end}, past the end of the file ({size})")
                self.index[name] = (path, 8 + n + begin, end - begin, info["dtype"], tuple(info["shape"]))
            for alias, target in meta.items():  # e.g. {"model.embed_tokens.weight": "lm_head.weight"}
                if isinstance(target, str) and target in header:
                    self.aliases[alias] = target

    def has(self, name: str) -> bool:
        return name in self.index or name in self.aliases

    def get(self, name: str) -> np.ndarray:
        key = name if name in self.index else self.aliases.get(name)
        if key is None:
            fail(f"checkpoint has no tensor '{name}'")
        path, offset, nbytes, dtype, shape = self.index[key]
        if dtype not in _ST_DTYPES:
            fail(f"tensor {name}: dtype {dtype} is not supported (expected F32, F16, BF16 or F64)")
        np_dtype = _ST_DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if count * np_dtype.itemsize != nbytes:
            fail(f"tensor {name}: {nbytes} bytes for shape {list(shape)} and dtype {dtype}")
        with open(path, "rb") as f:
            f.seek(offset)
            data = np.frombuffer(f.read(nbytes), dtype=np_dtype, count=count)
        if dtype == "BF16":
            data = bfloat16_bits_to_float32(data)
        return np.asarray(data, dtype=np.float32).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# RoPE frequencies (float32, as transformers and llama2.c compute them)
# ----------------------------------------------------------------------------------------------------------


def default_inv_freq(head_dim: int, theta: float, rotary_dim: Optional[int] = None) -> np.ndarray:
    rotary_dim = rotary_dim or head_dim
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def hf_rope(config: dict, head_dim: int) -> tuple:
    """(theta, inv_freq) for a HF config; supports rope types default, linear and llama3."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        fail("per-layer-type rope_parameters are not supported by the NumPy path (use capture_hf.py)")
    merged = dict(scaling)
    merged.update(params or {})
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    partial = merged.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        fail(f"partial_rotary_factor = {partial} is not supported by the NumPy path (use capture_hf.py)")
    inv_freq = default_inv_freq(head_dim, theta)
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = (inv_freq / np.float32(merged["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        factor = float(merged["factor"])
        low, high = float(merged["low_freq_factor"]), float(merged["high_freq_factor"])
        old_len = float(merged["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    else:
        fail(f"rope type '{rope_type}' is not supported by the NumPy path (default, linear, llama3; "
             "use capture_hf.py)")
    return float(theta), inv_freq


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------


def _hf_layer_types(config: dict, n_layers: int) -> tuple:
    window = config.get("sliding_window")
    types = config.get("layer_types")
    model_type = config.get("model_type")
    if types is None:
        if model_type == "mistral":
            types = ["sliding_attention" if window else "full_attention"] * n_layers
        elif model_type in ("qwen2", "qwen3"):
            use = bool(config.get("use_sliding_window", False)) and window is not None
            first = config.get("max_window_layers", n_layers)
            types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)]
        else:
            types = ["full_attention"] * n_layers
    types = list(types)
    if len(types) != n_layers:
        fail(f"config.json: layer_types has {len(types)} entries for {n_layers} layers")
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            fail(f"config.json: layer type '{t}' is not supported by the NumPy path (use capture_hf.py)")
    if "sliding_attention" in types:
        if not window:
            fail("config.json: sliding layers without a sliding_window")
        return types, int(window)
    return types, None


def load_hf(folder: str) -> tuple:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{cfg_path}: cannot read ({e})")
    if "text_config" in config and "num_hidden_layers" not in config:
        fail(f"{cfg_path}: a multimodal config (text_config); the NumPy path reads plain causal LMs only")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        fail(f"{cfg_path}: model_type '{model_type}' is not supported by the NumPy path "
             f"({', '.join(SUPPORTED_HF_TYPES)}); use scripts/capture_hf.py")
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act != "silu":
        fail(f"{cfg_path}: hidden_act '{act}' (expected silu)")
    try:
        dim = int(config["hidden_size"])
        n_layers = int(config["num_hidden_layers"])
        n_heads = int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        head_dim = int(config.get("head_dim") or dim // n_heads)
        hidden = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{cfg_path}: missing or bad key {e}")
    if config.get("mlp_bias"):
        fail(f"{cfg_path}: mlp_bias is not supported by the NumPy path")
    theta, inv_freq = hf_rope(config, head_dim)
    layer_types, window = _hf_layer_types(config, n_layers)

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
    else:
        files = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")]
    if not files:
        fail(f"{folder}: no .safetensors file (PyTorch .bin checkpoints need capture_hf.py)")
    st = SafeTensors(files)

    def get(name, shape=None):
        a = st.get(name)
        if shape is not None and tuple(a.shape) != tuple(shape):
            fail(f"tensor {name} has shape {list(a.shape)} (expected {list(shape)})")
        return a

    def opt(name, shape):
        return get(name, shape) if st.has(name) else None

    embed_name = "model.embed_tokens.weight" if st.has("model.embed_tokens.weight") else "lm_head.weight"
    embed = get(embed_name, (vocab, dim))
    if st.has("lm_head.weight"):
        lm_head = get("lm_head.weight", (vocab, dim))
    elif config.get("tie_word_embeddings", True):
        lm_head = embed
    else:
        fail(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
    weights = Weights(embed=embed, final_norm=get("model.norm.weight", (dim,)), lm_head=lm_head)
    qd, kvd = n_heads * head_dim, n_kv * head_dim
    qk_norm = model_type == "qwen3"
    for i in range(n_layers):
        p = f"model.layers.{i}."
        weights.layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight", (dim,)),
            wq_t=np.ascontiguousarray(get(p + "self_attn.q_proj.weight", (qd, dim)).T),
            wk_t=np.ascontiguousarray(get(p + "self_attn.k_proj.weight", (kvd, dim)).T),
            wv_t=np.ascontiguousarray(get(p + "self_attn.v_proj.weight", (kvd, dim)).T),
            wo_t=np.ascontiguousarray(get(p + "self_attn.o_proj.weight", (dim, qd)).T),
            ffn_norm=get(p + "post_attention_layernorm.weight", (dim,)),
            w1_t=np.ascontiguousarray(get(p + "mlp.gate_proj.weight", (hidden, dim)).T),
            w2_t=np.ascontiguousarray(get(p + "mlp.down_proj.weight", (dim, hidden)).T),
            w3_t=np.ascontiguousarray(get(p + "mlp.up_proj.weight", (hidden, dim)).T),
            bq=opt(p + "self_attn.q_proj.bias", (qd,)),
            bk=opt(p + "self_attn.k_proj.bias", (kvd,)),
            bv=opt(p + "self_attn.v_proj.bias", (kvd,)),
            q_norm=get(p + "self_attn.q_norm.weight", (head_dim,)) if qk_norm else None,
            k_norm=get(p + "self_attn.k_norm.weight", (head_dim,)) if qk_norm else None,
        ))
        if st.has(p + "self_attn.o_proj.bias"):
            fail(f"tensor {p}self_attn.o_proj.bias: output-projection biases are not supported by the NumPy path")
    eos = config.get("eos_token_id", 2)
    cfg = ModelConfig(
        name=os.path.basename(os.path.normpath(folder)), checkpoint_format="hf-safetensors", dim=dim,
        hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=vocab, norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_style="half",
        inv_freq=inv_freq, rope_theta=theta, softmax_scale=head_dim ** -0.5, layer_types=layer_types,
        sliding_window=window, bos_id=int(config.get("bos_token_id") if config.get("bos_token_id") is not None else 1),
        eos_id=eos[0] if isinstance(eos, list) else eos,
        max_positions=int(config.get("max_position_embeddings", 0) or 0), qk_norm=qk_norm)
    return cfg, weights


def load_llama2c(path: str) -> tuple:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        fail(f"{path}: cannot read ({e})")
    if len(head) < 28:
        fail(f"{path}: {size} bytes, too short for a llama2.c header")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == LLAMA2C_MAGIC:
        if len(head) < 256:
            fail(f"{path}: truncated llama2.c v1 header")
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            fail(f"{path}: llama2.c export version {version} (only version 1 float32 and the legacy format "
                 "are supported; version 2 is int8-quantized)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head[8:36])
        shared = head[36] != 0
        offset, fmt = 256, "llama2c-v1"
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head[:28])
        shared = vocab > 0
        vocab = abs(vocab)
        offset, fmt = 28, "llama2c-legacy"
    header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=vocab, seq_len=seq_len)
    if min(header.values()) <= 0 or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2 or dim > 1 << 16 \
            or n_layers > 4096:
        fail(f"{path}: not a llama2.c checkpoint (header {header})")
    hs = dim // n_heads
    kvd = n_kv * hs
    L = n_layers
    shapes_legacy = [("embed", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kvd, dim)),
                     ("wv", (L, kvd, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
                     ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
                     ("freq_real", (seq_len, hs // 2)), ("freq_imag", (seq_len, hs // 2))]
    shapes_v1 = [("rms_att", (L, dim)), ("rms_ffn", (L, dim)), ("rms_final", (dim,)), ("embed", (vocab, dim)),
                 ("wq", (L, dim, dim)), ("wk", (L, kvd, dim)), ("wv", (L, kvd, dim)), ("wo", (L, dim, dim)),
                 ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim))]
    shapes = shapes_v1 if fmt == "llama2c-v1" else shapes_legacy
    if not shared:
        shapes = shapes + [("wcls", (vocab, dim))]
    floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = offset + 4 * floats
    if size != expected:
        fail(f"{path}: {size} bytes, expected {expected} for a {fmt} checkpoint with header {header}"
             f"{' (truncated?)' if size < expected else ''}")
    data = np.fromfile(path, dtype="<f4", offset=offset, count=floats).astype(np.float32)
    t: Dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        t[name] = data[pos:pos + n].reshape(shape)
        pos += n
    weights = Weights(embed=t["embed"], final_norm=t["rms_final"], lm_head=t.get("wcls", t["embed"]))
    for i in range(L):
        weights.layers.append(LayerWeights(
            attn_norm=t["rms_att"][i], wq_t=np.ascontiguousarray(t["wq"][i].T), wk_t=np.ascontiguousarray(t["wk"][i].T),
            wv_t=np.ascontiguousarray(t["wv"][i].T), wo_t=np.ascontiguousarray(t["wo"][i].T),
            ffn_norm=t["rms_ffn"][i], w1_t=np.ascontiguousarray(t["w1"][i].T),
            w2_t=np.ascontiguousarray(t["w2"][i].T), w3_t=np.ascontiguousarray(t["w3"][i].T)))
    # llama2.c run.c: freq = 1.0f / powf(10000.0f, head_dim / (float)head_size), head_dim = 0, 2, 4, ...
    inv_freq = (np.float32(1.0) / np.power(np.float32(10000.0),
                                           np.arange(0, hs, 2).astype(np.float32) / np.float32(hs))).astype(np.float32)
    cfg = ModelConfig(
        name=os.path.splitext(os.path.basename(path))[0], checkpoint_format=fmt, dim=dim, hidden_dim=hidden,
        n_layers=L, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hs, vocab_size=vocab, norm_eps=1e-5,
        rope_style="interleaved", inv_freq=inv_freq, rope_theta=10000.0, softmax_scale=1.0 / math.sqrt(hs),
        layer_types=["full_attention"] * L, sliding_window=None, bos_id=1, eos_id=None, max_positions=seq_len)
    return cfg, weights


def load_model(path: str) -> tuple:
    if os.path.isdir(path):
        return load_hf(path)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return load_hf(os.path.dirname(os.path.abspath(path)))
        return load_llama2c(path)
    fail(f"{path}: no such file or folder (expected a Hugging Face folder or a llama2.c .bin checkpoint)")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers (SentencePiece-style BPE only; anything else: pass token ids)
# ----------------------------------------------------------------------------------------------------------


def bpe_merge(symbols: list, merge: Callable) -> list:
    """Repeatedly applies the best-ranked adjacent merge, leftmost first among equals, in O(n log n).
    merge(a, b) -> (priority, merged symbol) or None; lower priority merges first. This is what
    llama2.c's encode (highest score first) and the `tokenizers` BPE (lowest merge rank first) compute."""
    import heapq

    n = len(symbols)
    sym = list(symbols)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []

    def push(i):
        j = nxt[i]
        if j < n:
            m = merge(sym[i], sym[j])
            if m is not None:
                heapq.heappush(heap, (m[0], i, j, sym[i], sym[j], m[1]))

    for i in range(n - 1):
        push(i)
    while heap:
        _, i, j, a, b, merged = heapq.heappop(heap)
        if not (alive[i] and alive[j] and nxt[i] == j and sym[i] is a and sym[j] is b):
            continue  # stale entry
        sym[i] = merged
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        if prv[i] >= 0:
            push(prv[i])
        push(i)
    return [sym[i] for i in range(n) if alive[i]]


class Llama2cTokenizer:
    """llama2.c tokenizer.bin / tok512.bin: int32 max_token_length, then (float32 score, int32 len, bytes)."""

    def __init__(self, path: str, vocab_size: int):
        with open(path, "rb") as f:
            data = f.read()
        self.pieces: List[bytes] = []
        self.scores: List[float] = []
        pos = 4
        try:
            for _ in range(vocab_size):
                score, n = struct.unpack_from("<fi", data, pos)
                pos += 8
                if n < 0 or pos + n > len(data):
                    raise struct.error("bad piece length")
                self.pieces.append(data[pos:pos + n])
                self.scores.append(score)
                pos += n
        except struct.error:
            fail(f"{path}: not a llama2.c tokenizer for a {vocab_size}-token vocabulary")
        self.lookup = {p: i for i, p in enumerate(self.pieces)}
        self.bos = 1

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        if text:
            ids.append(self.lookup[b" "])  # SentencePiece's dummy prefix
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.lookup:
                ids.append(self.lookup[b])
            else:
                ids.extend(x + 3 for x in b)  # byte fallback: <0x00> is id 3
        def merge(a, b):
            j = self.lookup.get(self.pieces[a] + self.pieces[b])
            return None if j is None else (-self.scores[j], j)

        return bpe_merge(ids, merge)

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        prev = None
        for t in ids:
            t = int(t)
            if t in (1, 2):  # BOS / EOS markers are not text
                prev = t
                continue
            piece = self.pieces[t] if 0 <= t < len(self.pieces) else b""
            if prev == 1 and piece.startswith(b" "):
                piece = piece[1:]
            m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
            out += bytes([int(m.group(1), 16)]) if m else piece
            prev = t
        return out.decode("utf-8", errors="replace")


_UNK = object()  # placeholder symbol for a character outside the vocabulary; never merged


class HFBPETokenizer:
    """tokenizer.json of type BPE with a Metaspace/Prepend+Replace normalizer and byte fallback
    (Llama-2 / TinyStories style), encoding as the `tokenizers` library does with that file. Byte-level BPE
    (GPT-2, Llama 3, Qwen) is not supported here. Note: transformers 5's LlamaTokenizer rebuilds the
    pipeline (Metaspace, prepend_scheme=first) and can differ on leading spaces and unknown characters;
    pass --tokens for exact control."""

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            fail(f"{path}: tokenizer model '{model.get('type')}' (the NumPy path encodes BPE only; pass --tokens)")
        self.vocab: Dict[str, int] = model["vocab"]
        self.inv = {i: p for p, i in self.vocab.items()}
        for tok in tj.get("added_tokens", []):
            self.inv.setdefault(tok["id"], tok["content"])
        merges = model.get("merges", [])
        self.ranks = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            self.ranks.setdefault((a, b), r)
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.unk = self.vocab.get(model.get("unk_token") or "<unk>")
        pre = tj.get("pre_tokenizer")
        norm = json.dumps(tj.get("normalizer"))
        if pre is not None and pre.get("type") not in ("Metaspace",):
            fail(f"{path}: pre_tokenizer '{pre.get('type')}' is not supported by the NumPy path; pass --tokens")
        self.metaspace = pre is not None or ("Prepend" in norm and "\\u2581" in norm) or ("Prepend" in norm and "▁" in norm)
        if not self.metaspace:
            fail(f"{path}: normalizer {norm} is not SentencePiece-style; pass --tokens")

    def encode(self, text: str) -> List[int]:
        if not text:
            return []
        s = "▁" + text.replace(" ", "▁")
        symbols: List[str] = []
        for ch in s:
            if ch in self.vocab:
                symbols.append(ch)
                continue
            pieces = [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
            if self.byte_fallback and all(p in self.vocab for p in pieces):
                symbols.extend(pieces)
            elif not (self.fuse_unk and symbols and symbols[-1] is _UNK):
                symbols.append(_UNK)  # one unknown token per character, consecutive ones fused (fuse_unk)
        def merge(a, b):
            r = self.ranks.get((a, b)) if a is not _UNK and b is not _UNK else None
            return None if r is None else (r, a + b)

        symbols = bpe_merge(symbols, merge)
        return [self.unk if p is _UNK else self.vocab.get(p, self.unk) for p in symbols]

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for t in ids:
            piece = self.inv.get(int(t), "")
            if piece.startswith("<|") or piece in ("<s>", "</s>", "<unk>"):
                continue
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            out += bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def load_tokenizer(model_path: str, cfg: ModelConfig, explicit: Optional[str]):
    """The tokenizer for text prompts and decoding, or None when there is none we can read."""
    candidates = [explicit] if explicit else []
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    if not explicit:
        if cfg.checkpoint_format.startswith("llama2c"):
            candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                           if n.endswith(".bin") and n.startswith("tok")]
        else:
            candidates.append(os.path.join(folder, "tokenizer.json"))
    for path in candidates:
        if path and os.path.isfile(path):
            if path.endswith(".json"):
                return HFBPETokenizer(path)
            return Llama2cTokenizer(path, cfg.vocab_size)
    if explicit:
        fail(f"{explicit}: no such tokenizer file")
    return None


# ----------------------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------------------


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (w * (x / np.sqrt(var + np.float32(eps)))).astype(np.float32)


class LlamaNumpy:
    """Llama-family forward pass in float32 NumPy with a KV cache; attention in query tiles."""

    def __init__(self, cfg: ModelConfig, weights: Weights, tile: int = 128):
        self.cfg, self.w, self.tile = cfg, weights, tile
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.k_cache: List[np.ndarray] = [np.zeros((self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
                                          for _ in range(self.cfg.n_layers)]
        self.v_cache: List[np.ndarray] = [c.copy() for c in self.k_cache]

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x [H, n, d] -> rotated; float32 angles as transformers / llama2.c compute them."""
        ang = positions.astype(np.float32)[:, None] * self.cfg.inv_freq[None, :]     # [n, d/2]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        if self.cfg.rope_style == "half":
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
            return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: Optional[int]) -> np.ndarray:
        """q [Hq, n, d] at positions start..start+n-1; k, v [Hkv, S, d] with S = start+n -> out [n, Hq*d]."""
        Hq, n, d = q.shape
        Hkv = k.shape[0]
        G = Hq // Hkv
        qg = q.reshape(Hkv, G, n, d)
        out = np.empty((Hkv, G, n, d), np.float32)
        scale = np.float32(self.cfg.softmax_scale)
        for a in range(0, n, self.tile):
            b = min(n, a + self.tile)
            pos = np.arange(start + a, start + b)
            lo = 0 if window is None else max(0, int(pos[0]) - window + 1)
            hi = int(pos[-1]) + 1
            keys = np.arange(lo, hi)
            s = np.einsum("kgnd,ksd->kgns", qg[:, :, a:b], k[:, lo:hi], optimize=True) * scale
            allowed = keys[None, :] <= pos[:, None]
            if window is not None:
                allowed &= keys[None, :] > pos[:, None] - window
            s = np.where(allowed, s, -np.inf)
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[:, :, a:b] = np.einsum("kgns,ksd->kgnd", p.astype(np.float32), v[:, lo:hi], optimize=True)
        return out.reshape(Hq, n, d).transpose(1, 0, 2).reshape(n, Hq * d)

    def forward(self, tokens: Sequence[int], record: Optional[Callable] = None,
                last_layer: Optional[int] = None, logits: str = "last") -> Optional[np.ndarray]:
        """Appends `tokens` to the cache. record(layer, q [Hq,n,d], k [Hkv,n,d], v [Hkv,n,d]) sees post-RoPE
        tensors. Returns logits of the last position ("last"), of all positions ("all"), or None."""
        cfg, w = self.cfg, self.w
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size == 0:
            return None
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            fail(f"token id outside 0..{cfg.vocab_size - 1}")
        n, start = ids.size, self.length
        positions = np.arange(start, start + n)
        x = w.embed[ids].astype(np.float32)
        H, Hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        for li, lw in enumerate(w.layers):
            h = rmsnorm(x, lw.attn_norm, cfg.norm_eps)
            q, k, v = h @ lw.wq_t, h @ lw.wk_t, h @ lw.wv_t
            if lw.bq is not None:
                q = q + lw.bq
            if lw.bk is not None:
                k = k + lw.bk
            if lw.bv is not None:
                v = v + lw.bv
            q = q.reshape(n, H, d).transpose(1, 0, 2)
            k = k.reshape(n, Hkv, d).transpose(1, 0, 2)
            v = np.ascontiguousarray(v.reshape(n, Hkv, d).transpose(1, 0, 2), dtype=np.float32)
            if cfg.qk_norm:
                q = rmsnorm(q, lw.q_norm, cfg.norm_eps)
                k = rmsnorm(k, lw.k_norm, cfg.norm_eps)
            q, k = self._rope(q, positions), self._rope(k, positions)
            if record is not None:
                record(li, q, k, v)
            if last_layer is not None and li >= last_layer:
                return None
            self.k_cache[li] = np.concatenate([self.k_cache[li], k], axis=1)
            self.v_cache[li] = np.concatenate([self.v_cache[li], v], axis=1)
            att = self._attend(q, self.k_cache[li], self.v_cache[li], start, cfg.window_of(li))
            x = x + att @ lw.wo_t
            h = rmsnorm(x, lw.ffn_norm, cfg.norm_eps)
            gate = h @ lw.w1_t
            x = x + ((gate / (np.float32(1) + np.exp(-gate))) * (h @ lw.w3_t)) @ lw.w2_t
            x = x.astype(np.float32)
        self.length += n
        if logits == "none":
            return None
        xs = x[-1:] if logits == "last" else x
        out = rmsnorm(xs, w.final_norm, cfg.norm_eps) @ w.lm_head.T
        return out[0] if logits == "last" else out


def greedy(model: LlamaNumpy, prefix: Sequence[int], steps: int) -> List[int]:
    """Greedy continuation of `prefix` by `steps` tokens (argmax, ties to the lowest id)."""
    model.reset()
    logits = model.forward(prefix)
    out: List[int] = []
    for _ in range(steps):
        t = int(np.argmax(logits))
        out.append(t)
        logits = model.forward([t])
    return out


# ----------------------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------------------


def parse_ids(text: str) -> List[int]:
    try:
        return [int(x) for x in re.split(r"[\s,]+", text.strip()) if x]
    except ValueError:
        fail("token ids must be integers separated by commas or spaces", EXIT_USAGE)


def repeat_to(prefix: List[int], body: List[int], length: int) -> List[int]:
    if not body:
        fail("--repeat-to needs a non-empty prompt", EXIT_USAGE)
    seq = list(prefix)
    while len(seq) < length:
        seq.extend(body)
    return seq[:length]


def build_sequence(args, cfg: ModelConfig, model: LlamaNumpy, tokenizer) -> List[int]:
    prefix = [] if args.no_bos else [cfg.bos_id]
    body: List[int] = []
    sources = [s for s in (args.tokens, args.tokens_file, args.prompt, args.prompt_file) if s is not None]
    if len(sources) > 1:
        fail("give at most one of --tokens, --tokens-file, --prompt, --prompt-file", EXIT_USAGE)
    if args.tokens is not None:
        body = parse_ids(args.tokens)
    elif args.tokens_file is not None:
        with open(args.tokens_file) as f:
            body = parse_ids(f.read())
    elif args.prompt is not None or args.prompt_file is not None:
        text = args.prompt
        if args.prompt_file is not None:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        if tokenizer is None:
            fail("no tokenizer this script can read next to the model (pass --tokenizer, or token ids with "
                 "--tokens)", EXIT_USAGE)
        body = tokenizer.encode(text)
    seq = prefix + body
    if args.repeat_to:
        seq = repeat_to(prefix, body, args.repeat_to)
    gen = args.generate
    if gen is None:
        gen = max(0, args.seq_len - len(seq)) if not body else 0
    if gen:
        if not seq:
            fail("nothing to generate from (no BOS and no prompt)", EXIT_USAGE)
        seq = seq + greedy(model, seq, gen)
    if not seq:
        fail("empty sequence", EXIT_USAGE)
    return seq


def capture(cfg: ModelConfig, weights: Weights, tokens: Sequence[int], out_path: str, *, layers=None,
            dtype: str = "float32", store_v: bool = True, compression: Optional[str] = None, text: str = "",
            source: str = "", tile: int = 128) -> None:
    """One prefill over `tokens`; writes the chosen layers' post-RoPE q, k (and v) as capture v1."""
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    T = len(tokens)
    if cfg.max_positions and T > cfg.max_positions:
        print(f"capture_llama: note: {T} tokens exceed the trained context ({cfg.max_positions})", file=sys.stderr)
    types = [cfg.layer_types[i] for i in layers]
    extra = {"source_layers": np.asarray(layers, dtype=np.int64), "rope_theta": float(cfg.rope_theta),
             "checkpoint_format": cfg.checkpoint_format}
    writer = CaptureWriter(
        out_path, model=cfg.name, source=source, num_layers=len(layers), num_q_heads=cfg.n_heads,
        num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, seq_len=T, softmax_scale=cfg.softmax_scale,
        layer_types=types, sliding_window=cfg.sliding_window if "sliding_attention" in types else None,
        dtype=dtype, compression=compression, extra_attrs=extra)
    slot = {li: i for i, li in enumerate(layers)}

    def record(li, q, k, v):
        if li in slot:
            writer.write_layer(slot[li], q=q, k=k, v=v if store_v else None)

    try:
        model = LlamaNumpy(cfg, weights, tile=tile)
        model.forward(tokens, record=record, last_layer=max(layers), logits="none")
        writer.write_tokens(tokens)
        if text:
            writer.write_text(text)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="Hugging Face folder (config.json + *.safetensors) or llama2.c .bin checkpoint")
    ap.add_argument("-o", "--output", required=True, help="capture file to write (HDF5, format v1)")
    src = ap.add_argument_group("sequence")
    src.add_argument("--prompt", help="prompt text (needs a SentencePiece-style tokenizer next to the model)")
    src.add_argument("--prompt-file", help="read the prompt text from a file")
    src.add_argument("--tokens", help="prompt token ids, comma or space separated (BOS is added unless --no-bos)")
    src.add_argument("--tokens-file", help="read prompt token ids from a file")
    src.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    src.add_argument("--repeat-to", type=int, default=0, metavar="T", help="repeat the prompt up to T tokens")
    src.add_argument("--generate", type=int, default=None, metavar="N",
                     help="append N greedy tokens (default: without a prompt, generate from BOS up to --seq-len)")
    src.add_argument("--seq-len", type=int, default=256, help="length when generating from BOS alone (256)")
    src.add_argument("--tokenizer", help="tokenizer file (default: tok*.bin or tokenizer.json next to the model)")
    out = ap.add_argument_group("capture")
    out.add_argument("--layers", default="all", help="layers to capture: all, or e.g. 0,2,5-7 (all)")
    out.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="element type stored (float32)")
    out.add_argument("--no-v", action="store_true", help="do not store v")
    out.add_argument("--gzip", action="store_true", help="gzip-compress the datasets")
    out.add_argument("--tile", type=int, default=128, help="query rows per attention tile (128)")
    out.add_argument("--print-tokens", action="store_true", help="print the token ids and the decoded text")
    args = ap.parse_args(argv)
    try:
        if args.seq_len <= 0 or (args.generate is not None and args.generate < 0) or args.repeat_to < 0 \
                or args.tile <= 0:
            fail("--seq-len and --tile must be positive, --generate and --repeat-to non-negative", EXIT_USAGE)
        t0 = time.time()
        cfg, weights = load_model(args.model)
        layers = parse_layer_list(args.layers, cfg.n_layers)
        tokenizer = load_tokenizer(args.model, cfg, args.tokenizer)
        model = LlamaNumpy(cfg, weights, tile=args.tile)
        tokens = build_sequence(args, cfg, model, tokenizer)
        text = tokenizer.decode(tokens) if tokenizer is not None else ""
        if args.print_tokens:
            print("tokens:", " ".join(str(t) for t in tokens))
            if text:
                print("text:", text)
        source = (f"scripts/capture_llama.py (NumPy {np.__version__}) {cfg.checkpoint_format} "
                  f"{os.path.abspath(args.model)}; {len(tokens)} tokens; layers {args.layers}")
        capture(cfg, weights, tokens, args.output, layers=layers, dtype=args.dtype, store_v=not args.no_v,
                compression="gzip" if args.gzip else None, text=text, source=source, tile=args.tile)
        print(f"wrote {args.output} ({len(layers)} layers, {cfg.n_heads} q heads, {cfg.n_kv_heads} kv heads, "
              f"head_dim {cfg.head_dim}, seq_len {len(tokens)}, {args.dtype}) in {time.time() - t0:.2f} s")
        return 0
    except CaptureError as e:
        print(f"capture_llama: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("capture_llama: interrupted", file=sys.stderr)
        return 7


if __name__ == "__main__":
    sys.exit(main())
