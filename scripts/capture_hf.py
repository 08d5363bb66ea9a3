#!/usr/bin/env python3
"""Capture post-RoPE Q/K/V from a Hugging Face causal LM (PyTorch + transformers) as a hysparse capture
(format v1), without ever building a T x T matrix.

It registers an attention function with transformers' AttentionInterface that wraps the model's own
attention (sdpa by default, or eager / flash_attention_2 / ... with --attn-base) and records, at every
attention call: `query` (post-RoPE, exactly what the softmax sees), `key` and `value` (the un-repeated KV
heads, stored once per KV head), the call's `scaling`, its `sliding_window`, and the attention-sink
logits when the model has them (gpt-oss `s_aux` / `module.sinks`). output_attentions is never requested.
Each layer is written to the capture as soon as it is computed, head by head, so host memory stays at
one head's [T, head_dim]; the forward pass stops after the last captured layer (no logits).

Safety: the attention mask the model passes is checked on sample rows against the causal (or sliding
window) pattern the capture will declare; soft-capped logits, additive biases (ALiBi), non-causal masks,
cached/partial keys, batch > 1 and layers that never reach the attention interface are errors, never a
silent wrong capture. Tested families: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 (without logit
soft-capping), Gemma 3 (text), gpt-oss (sinks); others that dispatch through AttentionInterface work
the same way.

Examples:
  scripts/capture_hf.py meta-llama/Llama-3.2-1B -o llama.h5 --prompt-file book.txt --repeat-to 8192
  scripts/capture_hf.py ../shared/models/TinyStories-656K -o ts.h5 --offline --prompt "Once upon a time" \
      --generate 200 --device cpu
Exit codes: 0 ok, 2 usage, 3 bad or unsupported model/input, 4 output not writable, 1 internal.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capture_format import (EXIT_INPUT, EXIT_USAGE, CaptureError, CaptureWriter,  # noqa: E402
                            parse_layer_list)

CAPTURE_NAME = "hysparse_capture"
# kwargs of attention functions that do not change what the softmax computes (for a prefill, batch 1)
HARMLESS_KWARGS = {"dropout", "scaling", "sliding_window", "s_aux", "softcap", "is_causal", "position_ids",
                   "cache_position", "output_attentions", "use_cache", "return_dict", "past_key_value",
                   "past_key_values", "cache", "position_embeddings", "cu_seq_lens_q", "cu_seq_lens_k",
                   "max_length_q", "max_length_k", "layer_idx", "output_hidden_states", "logits_to_keep",
                   "target_dtype", "token_type_ids"}


def fail(message: str, code: int = EXIT_INPUT):
    raise CaptureError(message, code)


class _StopForward(Exception):
    """Raised after the last captured layer: the rest of the forward pass is not needed."""


def _import_torch():
    try:
        import torch
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as e:
        fail(f"capture_hf.py needs PyTorch and transformers >= 4.54 with AttentionInterface and "
             f"AttentionMaskInterface ({e}); for small Llama checkpoints without PyTorch use capture_llama.py",
             EXIT_USAGE)
    return torch, transformers, AttentionInterface, AttentionMaskInterface, ALL_ATTENTION_FUNCTIONS, \
        ALL_MASK_ATTENTION_FUNCTIONS


class Recorder:
    """The registered attention function: records, then runs the base attention unchanged."""

    def __init__(self):
        self.active = False
        self.session: Optional["CaptureSession"] = None
        self.base_name = "sdpa"
        self.functions = {}

    def base_function(self, module):
        if self.base_name == "eager":
            fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if fn is None:
                fail(f"{type(module).__name__}: its module has no eager_attention_forward; use --attn-base sdpa")
            return fn
        return self.functions[self.base_name]

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        if self.active and self.session is not None:
            self.session.record(module, query, key, value, attention_mask, args, kwargs)
        out = self.base_function(module)(module, query, key, value, attention_mask, *args, **kwargs)
        if self.active and self.session is not None and self.session.done():
            raise _StopForward()
        return out


RECORDER = Recorder()


def install(model, base: str = "auto") -> str:
    """Switches `model` to the capture attention wrapping `base` ("auto": the implementation the model
    loaded with, sdpa where it supports it, else eager). Returns the base's name."""
    torch, transformers, AttentionInterface, AttentionMaskInterface, funcs, masks = _import_torch()
    current = model.config._attn_implementation
    if base == "auto":
        base = current if current and current != CAPTURE_NAME else RECORDER.base_name
    if base != "eager" and base not in funcs:
        fail(f"--attn-base {base}: not an attention implementation transformers knows "
             f"(eager, {', '.join(k for k in funcs.keys() if k != CAPTURE_NAME)})", EXIT_USAGE)
    if base not in masks:
        fail(f"--attn-base {base}: no mask function registered for it", EXIT_USAGE)
    RECORDER.base_name = base
    RECORDER.functions = funcs
    AttentionInterface.register(CAPTURE_NAME, RECORDER)
    AttentionMaskInterface.register(CAPTURE_NAME, masks[base])
    try:
        model.set_attn_implementation(CAPTURE_NAME)
    except Exception as e:  # noqa: BLE001 - transformers raises several types here
        fail(f"{type(model).__name__}: cannot switch its attention implementation ({e}); this architecture does "
             "not dispatch attention through transformers' AttentionInterface, so it cannot be captured")
    if model.config._attn_implementation != CAPTURE_NAME:
        fail(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface "
             f"(it kept '{model.config._attn_implementation}'), so it cannot be captured")
    return base


def _to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class CaptureSession:
    """One capture: the layers wanted, the writer, and what the attention calls told us."""

    def __init__(self, model, out_path: str, tokens: Sequence[int], *, layers: Optional[Sequence[int]] = None,
                 dtype: str = "float32", store_v: bool = True, compression: Optional[str] = None,
                 model_name: str = "", source: str = "", text: str = "", check_rows: int = 8):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cfg = cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.layers = list(range(self.num_layers)) if layers is None else list(layers)
        self.slot = {li: i for i, li in enumerate(self.layers)}
        self.out_path, self.tokens, self.T = out_path, list(tokens), len(tokens)
        self.dtype, self.store_v, self.compression = dtype, store_v, compression
        self.model_name, self.source, self.text = model_name, source, text
        self.check_rows = check_rows
        self.writer: Optional[CaptureWriter] = None
        self.seen: Dict[int, dict] = {}
        self.scale0: Optional[float] = None
        self.head_dim = self.num_q = self.num_kv = None
        self.notes: List[str] = []
        self.config_types = list(getattr(cfg, "layer_types", None) or [])
        self.config_window = getattr(cfg, "sliding_window", None)

    def done(self) -> bool:
        return len(self.seen) == len(self.layers)

    # -- checks ------------------------------------------------------------------------------------------

    def _layer_window(self, layer: int, kwargs: dict) -> Optional[int]:
        kw = kwargs.get("sliding_window")
        ctype = self.config_types[layer] if layer < len(self.config_types) else None
        if ctype not in (None, "full_attention", "sliding_attention"):
            fail(f"layer {layer}: layer type '{ctype}' (e.g. chunked attention) is not supported by capture_hf.py")
        if kw is not None:
            kw = int(kw)
            if kw <= 0:
                fail(f"layer {layer}: sliding_window = {kw}")
            return kw
        if ctype == "sliding_attention":
            if not self.config_window:
                fail(f"layer {layer}: config says sliding_attention but has no sliding_window")
            return int(self.config_window)
        return None

    def _check_mask(self, layer: int, mask, window: Optional[int], module, kwargs: dict) -> None:
        import torch

        T = self.T
        if mask is None:
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            if not is_causal:
                fail(f"layer {layer}: non-causal attention (no mask and is_causal = False)")
            return
        if not isinstance(mask, torch.Tensor):
            self.notes.append(f"layer {layer}: mask of type {type(mask).__name__} not checked")
            return
        if mask.dim() == 2:  # padding mask (flash attention): must keep every token
            if not bool(mask.bool().all()):
                fail(f"layer {layer}: the padding mask drops tokens (expected one unpadded sequence)")
            return
        if mask.dim() != 4 or mask.shape[-2] != T or mask.shape[-1] != T:
            fail(f"layer {layer}: attention mask of shape {list(mask.shape)} (expected [1, 1 or heads, {T}, {T}])")
        rows = sorted({0, 1, T // 3, T // 2, T - 1} | ({window - 1, window, window + 1, T - window} if window else set()))
        rows = [t for t in rows if 0 <= t < T][: max(self.check_rows, 5) + 4]
        keys = torch.arange(T, device=mask.device)
        for t in rows:
            expect = keys <= t
            if window is not None:
                expect &= keys > t - window
            for h in {0, mask.shape[1] - 1}:
                row = mask[0, h, t]
                if row.dtype == torch.bool:
                    keep = row
                else:
                    keep = row > torch.finfo(row.dtype).min / 2
                    if bool((row[keep] != 0).any()):
                        fail(f"layer {layer}: the attention mask adds a bias (e.g. ALiBi) to row {t}; logits of "
                             "such models are not q.k alone, so they cannot be captured as q/k")
                if not bool((keep == expect).all()):
                    what = f"causal sliding-window ({window} keys)" if window else "causal"
                    first = int((keep != expect).nonzero()[0].item())
                    fail(f"layer {layer}: the model's attention mask at row {t}, key {first} is not the {what} "
                         "pattern the capture would declare (bidirectional, chunked or packed attention is not "
                         "supported)")

    # -- recording ---------------------------------------------------------------------------------------

    def record(self, module, query, key, value, mask, args, kwargs) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            fail(f"{type(module).__name__} has no layer_idx; cannot tell which layer is calling")
        layer = int(layer)
        if layer in self.seen:
            fail(f"layer {layer} called attention twice in one forward pass (shared or cross-attention layers "
                 "are not supported)")
        if layer not in self.slot:
            return
        if args:
            fail(f"layer {layer}: attention called with {len(args)} extra positional arguments (unknown API)")
        if kwargs.get("softcap") is not None:
            fail(f"layer {layer}: attention logit soft-capping (softcap = {kwargs['softcap']}) is not representable "
                 "in capture format v1 (replay would compute other probabilities); load the model with "
                 "attn_logit_softcapping=None if you accept that change")
        unknown = sorted(k for k, v in kwargs.items() if k not in HARMLESS_KWARGS and v is not None)
        if unknown:
            self.notes.append(f"layer {layer}: attention kwargs not interpreted: {', '.join(unknown)}")
        if query.dim() != 4 or key.dim() != 4:
            fail(f"layer {layer}: query/key of rank {query.dim()}/{key.dim()} (expected [batch, heads, T, d])")
        B, Hq, Tq, d = query.shape
        _, Hkv, S, dk = key.shape
        if B != 1:
            fail(f"layer {layer}: batch {B} (capture one sequence at a time)")
        if Tq != self.T or S != self.T:
            fail(f"layer {layer}: {Tq} queries over {S} keys for a {self.T}-token prompt (a cache or chunked "
                 "prefill is in use; capture runs one full prefill)")
        if dk != d:
            fail(f"layer {layer}: query head_dim {d} != key head_dim {dk}")
        if Hq % Hkv:
            fail(f"layer {layer}: {Hq} query heads over {Hkv} KV heads")
        window = self._layer_window(layer, kwargs)
        self._check_mask(layer, mask, window, module, kwargs)
        scale = kwargs.get("scaling")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        sinks = kwargs.get("s_aux")
        if sinks is None and getattr(module, "sinks", None) is not None:
            sinks = module.sinks
        if sinks is not None:
            sinks = _to_numpy(sinks).reshape(-1)
            if sinks.shape != (Hq,):
                fail(f"layer {layer}: sink logits of shape {list(sinks.shape)} (expected [{Hq}])")
        if self.writer is None:
            self.num_q, self.num_kv, self.head_dim, self.scale0 = Hq, Hkv, d, scale
            extra = {"source_layers": np.asarray(self.layers, dtype=np.int64), "attn_base": RECORDER.base_name}
            self.writer = CaptureWriter(self.out_path, model=self.model_name, source=self.source,
                                        num_layers=len(self.layers), num_q_heads=Hq, num_kv_heads=Hkv, head_dim=d,
                                        seq_len=self.T, softmax_scale=scale, dtype=self.dtype,
                                        compression=self.compression, extra_attrs=extra)
        elif (Hq, Hkv, d) != (self.num_q, self.num_kv, self.head_dim):
            fail(f"layer {layer}: {Hq} q heads, {Hkv} kv heads, head_dim {d}, unlike the first captured layer "
                 f"({self.num_q}, {self.num_kv}, {self.head_dim}); capture such layers separately with --layers")
        fold = scale / self.scale0
        if abs(fold - 1) > 1e-12:
            self.notes.append(f"layer {layer}: softmax scale {scale:g} folded into q (file scale {self.scale0:g})")
        slot = self.slot[layer]
        w = self.writer
        for h in range(Hq):
            qh = _to_numpy(query[0, h])
            w.write_head(slot, "q", h, qh * np.float32(fold) if fold != 1 else qh)
        for h in range(Hkv):
            w.write_head(slot, "k", h, _to_numpy(key[0, h]))
        if self.store_v:
            if value.shape[-1] == d and value.shape[1] == Hkv:
                for h in range(Hkv):
                    w.write_head(slot, "v", h, _to_numpy(value[0, h]))
            else:
                self.notes.append(f"layer {layer}: v of shape {list(value.shape)} not stored (head_dim differs)")
        if sinks is not None:
            w.write(slot, "sink_logits", sinks)
        w._file.flush()
        self.seen[layer] = {"window": window, "scale": scale, "sinks": sinks is not None}

    def finish(self) -> None:
        missing = [li for li in self.layers if li not in self.seen]
        if missing:
            if self.writer is not None:
                self.writer.abort()
            fail(f"layers {missing} never called the attention interface (not attention layers, or an "
                 "architecture that computes attention elsewhere); nothing was written. Choose attention layers "
                 "with --layers")
        windows = {self.seen[li]["window"] for li in self.layers} - {None}
        if len(windows) > 1:
            self.writer.abort()
            fail(f"sliding layers with different windows {sorted(windows)}: capture format v1 has one "
                 "sliding_window; capture them separately with --layers")
        types = ["sliding_attention" if self.seen[li]["window"] else "full_attention" for li in self.layers]
        self.writer.set_layer_types(types, windows.pop() if windows else None)
        self.writer.write_tokens(self.tokens)
        if self.text:
            self.writer.write_text(self.text)
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def capture_model(model, tokens: Sequence[int], out_path: str, **options) -> CaptureSession:
    """Runs one prefill of `tokens` through `model` (already switched by install()) and writes the capture."""
    import torch

    session = CaptureSession(model, out_path, tokens, **options)
    device = next(model.parameters()).device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    RECORDER.session, RECORDER.active = session, True
    try:
        with torch.inference_mode():
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
        session.finish()
    except BaseException:
        session.abort()
        raise
    finally:
        RECORDER.active, RECORDER.session = False, None
    return session


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_ids(text: str) -> List[int]:
    try:
        return [int(x) for x in re.split(r"[\s,]+", text.strip()) if x]
    except ValueError:
        fail("token ids must be integers separated by commas or spaces", EXIT_USAGE)


def greedy(model, prefix: Sequence[int], steps: int) -> List[int]:
    """Greedy continuation (argmax, through EOS like capture_llama.py) with the model's KV cache."""
    import torch

    import inspect

    device = next(model.parameters()).device
    # transformers >= 5.2x names the KV cache `cache` (in and out); earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out_ids: List[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
        for _ in range(steps):
            t = int(out.logits[0, -1].float().argmax())
            out_ids.append(t)
            if len(out_ids) == steps:
                break
            cache = out.get(name, None) if hasattr(out, "get") else getattr(out, name, None)
            out = model(input_ids=torch.tensor([[t]], device=device), use_cache=True, **{name: cache})
    return out_ids


def build_tokens(args, model, tokenizer) -> List[int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(cfg, "bos_token_id", None)
    sources = [s for s in (args.tokens, args.tokens_file, args.prompt, args.prompt_file) if s is not None]
    if len(sources) > 1:
        fail("give at most one of --tokens, --tokens-file, --prompt, --prompt-file", EXIT_USAGE)
    prefix: List[int] = [] if args.no_bos or bos is None else [int(bos)]
    body: List[int] = []
    if args.tokens is not None or args.tokens_file is not None:
        text = args.tokens
        if args.tokens_file is not None:
            with open(args.tokens_file) as f:
                text = f.read()
        body = parse_ids(text)
    elif args.prompt is not None or args.prompt_file is not None:
        text = args.prompt
        if args.prompt_file is not None:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        if tokenizer is None:
            fail("the model has no tokenizer that transformers can load; pass --tokens", EXIT_USAGE)
        full = list(tokenizer(text, add_special_tokens=not args.no_bos)["input_ids"])
        body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        # the special tokens the tokenizer puts before the text (BOS); any it appends (EOS) are dropped
        prefix = next((full[:i] for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), [])
    seq = prefix + body
    if args.repeat_to:
        if not body:
            fail("--repeat-to needs a non-empty prompt", EXIT_USAGE)
        while len(seq) < args.repeat_to:
            seq += body
        seq = seq[:args.repeat_to]
    gen = args.generate if args.generate is not None else (0 if body else max(0, args.seq_len - len(seq)))
    if gen:
        if not seq:
            fail("nothing to generate from (no BOS and no prompt)", EXIT_USAGE)
        seq = seq + greedy(model, seq, gen)
    if not seq:
        fail("empty sequence", EXIT_USAGE)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab and (min(seq) < 0 or max(seq) >= vocab):
        fail(f"token ids outside 0..{vocab - 1}", EXIT_USAGE)
    return seq


def load(args):
    torch, transformers, *_ = _import_torch()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device visible to PyTorch", EXIT_USAGE)
    dtype = args.torch_dtype
    if dtype == "auto":
        dtype = "auto" if device != "cpu" else "float32"
    kwargs = dict(local_files_only=args.offline, trust_remote_code=args.trust_remote_code)
    if args.revision:
        kwargs["revision"] = args.revision
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = "auto"
    if args.attn_base != "auto":
        kwargs["attn_implementation"] = args.attn_base
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        fail(f"{args.model}: cannot load with transformers ({str(e).splitlines()[0]})")
    model.to(device).eval()
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=args.offline,
                                                               trust_remote_code=args.trust_remote_code,
                                                               **({"revision": args.revision} if args.revision else {}))
    except Exception as e:  # noqa: BLE001 - any tokenizer problem just means "no text"
        print(f"capture_hf: note: no tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
              file=sys.stderr)
    return model, tokenizer, device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="local folder or Hugging Face hub name of a causal LM")
    ap.add_argument("-o", "--output", required=True, help="capture file to write (HDF5, format v1)")
    src = ap.add_argument_group("sequence")
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer, BOS included)")
    src.add_argument("--prompt-file", help="read the prompt text from a file")
    src.add_argument("--tokens", help="prompt token ids, comma or space separated (BOS prepended unless --no-bos)")
    src.add_argument("--tokens-file", help="read prompt token ids from a file")
    src.add_argument("--no-bos", action="store_true", help="no BOS / special tokens added")
    src.add_argument("--repeat-to", type=int, default=0, metavar="T", help="repeat the prompt up to T tokens")
    src.add_argument("--generate", type=int, default=None, metavar="N",
                     help="append N greedy tokens (default: without a prompt, generate from BOS up to --seq-len)")
    src.add_argument("--seq-len", type=int, default=256, help="length when generating from BOS alone (256)")
    run = ap.add_argument_group("model")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    run.add_argument("--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="model dtype (auto: the checkpoint's on GPU, float32 on CPU)")
    run.add_argument("--attn-base", default="auto",
                     help="attention that runs under the recorder: auto (what the model picks: sdpa, else eager), "
                          "sdpa, eager, flash_attention_2, ...")
    run.add_argument("--offline", action="store_true", help="local files only (no network)")
    run.add_argument("--revision", help="hub revision")
    run.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")
    out = ap.add_argument_group("capture")
    out.add_argument("--layers", default="all", help="layers to capture: all, or e.g. 0,2,5-7 (all)")
    out.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="element type stored (float32)")
    out.add_argument("--no-v", action="store_true", help="do not store v")
    out.add_argument("--gzip", action="store_true", help="gzip-compress the datasets")
    out.add_argument("--print-tokens", action="store_true", help="print the token ids and the decoded text")
    args = ap.parse_args(argv)
    try:
        if args.seq_len <= 0 or args.repeat_to < 0 or (args.generate is not None and args.generate < 0):
            fail("--seq-len must be positive, --generate and --repeat-to non-negative", EXIT_USAGE)
        t0 = time.time()
        torch, transformers, *_ = _import_torch()
        model, tokenizer, device = load(args)
        base = install(model, args.attn_base)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = parse_layer_list(args.layers, int(cfg.num_hidden_layers))
        tokens = build_tokens(args, model, tokenizer)
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        if args.print_tokens:
            print("tokens:", " ".join(map(str, tokens)))
            if text:
                print("text:", text)
        dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
        source = (f"scripts/capture_hf.py {args.model}: transformers {transformers.__version__}, torch "
                  f"{torch.__version__}, {type(model).__name__}, attention {base} on {device}, {dtype_name}; "
                  f"{len(tokens)} tokens; layers {args.layers}")
        name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
        session = capture_model(model, tokens, args.output, layers=layers, dtype=args.dtype,
                                store_v=not args.no_v, compression="gzip" if args.gzip else None,
                                model_name=name, source=source, text=text)
        for note in session.notes:
            print(f"capture_hf: note: {note}", file=sys.stderr)
        print(f"wrote {args.output} ({len(layers)} layers, {session.num_q} q heads, {session.num_kv} kv heads, "
              f"head_dim {session.head_dim}, seq_len {len(tokens)}, {args.dtype}; {type(model).__name__}, "
              f"{base} on {device}, {dtype_name}) in {time.time() - t0:.1f} s")
        return 0
    except CaptureError as e:
        print(f"capture_hf: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("capture_hf: interrupted", file=sys.stderr)
        return 7


if __name__ == "__main__":
    sys.exit(main())
