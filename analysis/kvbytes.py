"""KV bytes each selector of a replay report keeps, per sequence, at the capture's length.

`selector_kv(report)` prices every selector of a replay report at every budget, for the
recall-vs-KV (Pareto) figure and the summary.

One source of truth: reports of current tools carry ``/selectors/<label>/kv_resident_bytes``
[budget] (K/V in bf16 plus the selector's metadata, whole model, batch 1, at the capture's
length, computed in C++ from the one footprint table) and ``/selectors`` attribute
``kv_full_bytes``. Those numbers are used as they are (``SelectorKv.source == "report"``).

FALLBACK, for older reports without ``kv_resident_bytes`` only (``source == "fallback"``,
said so in captions and the summary): the bytes are re-derived here from the selector
attributes, following the README's residency rules. This re-derivation is not maintained
against new selectors; a selector whose ``kv_residency`` it does not know is left out. It
counts per-token metadata only: the footprint table also prices fixed-size metadata (duo's
one fp32 gate per KV head per layer), which the fallback leaves out.

- bytes of one token's K and V in one layer: ``/kv`` attribute ``bytes_per_token_per_layer``
  (the KV dtype of the /kv table, bf16 for replay reports); without /kv,
  ``2 x num_kv_heads x head_dim x 2`` bytes (bf16) from /capture;
- selectors that keep the full cache: ``/kv/full_attention_bytes`` at the capture's length T
  (divided by the table's batch);
- hysparse (and any hybrid layout): ``/kv/kv_bytes`` (or ``resident_bytes`` less ``metadata_bytes``)
  of the /kv method "hysparse" at T, when that row's schedule, window and sinks are the selector's;
  otherwise the documented layout: full layers T tokens, sparse layers ``min(T, window + sinks)``;
- evicting selectors: what one KV head holds at the last position (row t = T - 1), from the
  selector's attributes (budget semantics of the README, "Replay: definitions");
- metadata: ``kv_metadata_bytes_per_token_per_kv_head x resident tokens x KV heads x layers``
  (the selector attribute, priced by the C++ footprint table at the replayed head_dim, bf16).

Nothing here reads files: it works on a loaded `Report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .report import Report, Selector

__all__ = ["RESIDENCY_RULES", "RULE_TEXT", "SelectorKv", "KvAccounting", "selector_kv", "budget_tokens_at",
           "pareto_frontier"]

# The selector attribute `kv_residency` (C++ to_string(KvResidency)) -> how its bytes are counted here.
RESIDENCY_RULES = {
    "all layers full": "full",
    "full KV, a budget attended per step": "full",
    "sinks + window on every layer": "window",
    "full layers all tokens, window layers a window": "hybrid",
    "full layers all tokens, sparse layers a window + top-k reads of the full layer": "hybrid",
    "a token budget kept": "evict",
    "retrieval heads full, streaming heads sinks + recent": "head-split",
}

# One line per rule, for captions and the summary.
RULE_TEXT = {
    "full": "the full cache: T tokens in every layer",
    "hybrid": "full layers T tokens, sparse layers their window + sinks",
    "window": "window (the budget, or the fixed window) + sinks in every layer",
    "evict": "the token budget (the cache size) + forced keys in every layer",
    "evict-prompt": "the compressed prompt (the budget) + every key after the prompt, in every layer",
    "head-split": "retrieval KV heads T tokens, streaming KV heads sinks + recent",
}


@dataclass(frozen=True, eq=False)
class SelectorKv:
    """One selector's resident KV bytes per sequence at T, per budget (float64 arrays over the budget axis).

    ``resident_bytes`` (K/V + metadata) is the number to plot. From the report (``source == "report"``)
    it is ``kv_resident_bytes`` as written; the breakdown fields are then None. From the fallback
    (``source == "fallback"``) it is ``kv_bytes + metadata_bytes`` and ``rule`` names the residency rule.
    """

    label: str
    resident_bytes: np.ndarray            # K/V + resident metadata, bytes
    source: str                           # "report" | "fallback"
    origin: str                           # the dataset used ("/selectors/x/kv_resident_bytes", "/kv/...") or "formula"
    residency: str                        # the selector's kv_residency attribute (what one KV head holds), or ""
    metadata_per_token: float             # the selector's kv_metadata_bytes_per_token_per_kv_head
    rule: Optional[str] = None            # fallback only: a RULE_TEXT key (full, hybrid, window, evict, ...)
    resident_tokens: Optional[np.ndarray] = None   # fallback only: tokens held, summed over layers and KV heads
    kv_bytes: Optional[np.ndarray] = None          # fallback only: K and V bytes
    metadata_bytes: Optional[np.ndarray] = None    # fallback only: metadata x resident tokens

    @property
    def total_bytes(self) -> np.ndarray:
        return self.resident_bytes

    @property
    def from_report(self) -> bool:
        return self.source == "report"


@dataclass(frozen=True, eq=False)
class KvAccounting:
    """The pricing of every selector of a report, and the constants it used."""

    seq_len: int
    num_layers: int
    num_kv_heads: int
    bytes_per_token_per_layer: float   # K and V of one token in one layer (all KV heads)
    dtype: str
    bytes_source: str                  # where bytes_per_token_per_layer comes from
    full_kv_bytes: float               # every layer, T tokens, one sequence
    full_source: str
    selectors: Dict[str, SelectorKv] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)   # label -> why it has no price

    @property
    def bytes_per_token_per_kv_head(self) -> float:
        return self.bytes_per_token_per_layer / self.num_kv_heads

    @property
    def source(self) -> str:
        """"report" when every priced selector's bytes come from kv_resident_bytes, "fallback" when none
        does, else "mixed"."""
        kinds = {sk.source for sk in self.selectors.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def from_report(self) -> List[str]:
        return [l for l, sk in self.selectors.items() if sk.from_report]

    def from_fallback(self) -> List[str]:
        return [l for l, sk in self.selectors.items() if not sk.from_report]


def _int(value: Any, default: Optional[int] = None) -> Optional[int]:
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def budget_tokens_at(report: Report, budget_index: int, block: int, row: int) -> int:
    """Tokens the budget selects at query row `row` with blocks of `block` keys (blocks x block).

    Token budgets: ``floor(k/B)`` blocks; sparsity: ``max(1, ceil((1-s)(row+1)/B - 1e-9))`` blocks
    (the README's definition, as Budget::blocks_for_row)."""
    b = report.budgets
    v = float(b.values[budget_index])
    block = max(int(block), 1)
    if b.is_tokens:
        return int(v) // block * block
    keep = (1.0 - v) * (row + 1)
    return max(1, int(math.ceil(keep / block - 1e-9))) * block


def _rule(s: Selector) -> Optional[str]:
    residency = s.attrs.get("kv_residency")
    if isinstance(residency, str) and residency in RESIDENCY_RULES:
        return RESIDENCY_RULES[residency]
    if residency is not None:
        return None  # a residency this package does not know: no guess
    evicts = s.attrs.get("evicts")
    if evicts is None:
        return None
    if s.has_full_layers and s.sparse_layers.size:
        return "hybrid"
    return "evict" if int(evicts) else "full"


def _schedule_string(s: Selector) -> str:
    return "".join("F" if f else "S" for f in s.is_full_layer)


def _kv_hybrid_bytes(report: Report, s: Selector, T: int) -> Optional[Tuple[float, str]]:
    """K/V bytes of the /kv hysparse (or hybrid-swa) row at T when it has the selector's layout."""
    kv = report.kv
    if kv is None:
        return None
    j = kv.context_index(T)
    if j is None:
        return None
    for method in ("hysparse", "hybrid-swa"):
        i = kv.method_index(method)
        if i is None:
            continue
        sched = kv.method_attr("schedule", i)
        resolved = kv.method_attr("resolved", i) or method
        params = dict(p.split("=", 1) for p in resolved.partition(":")[2].split(",") if "=" in p)
        if sched != _schedule_string(s):
            continue
        if _int(params.get("window")) != s.window or _int(params.get("sinks"), 0) != s.sinks:
            continue
        if kv.has("kv_bytes"):
            return float(kv["kv_bytes"][i, j]) / kv.batch, f"/kv/kv_bytes[{method}, {T}]"
        if kv.has("resident_bytes"):
            meta = float(kv["metadata_bytes"][i, j]) if kv.has("metadata_bytes") else 0.0
            return (float(kv["resident_bytes"][i, j]) - meta) / kv.batch, f"/kv/resident_bytes[{method}, {T}]"
    return None


def selector_kv(report: Report) -> Optional[KvAccounting]:
    """Price every selector of a replay report; None when the report cannot be priced at all
    (a KV report, no sequence length, or selectors with neither kv_resident_bytes nor the KV attributes).

    A selector with ``kv_resident_bytes`` gets those numbers; the others (older reports) the fallback."""
    if report.is_kv_report or not report.selectors:
        return None
    cap = report.capture
    T = _int(cap.get("seq_len"))
    if T is None and report.query_positions.size:
        T = int(report.query_positions.max()) + 1
    if not T or T <= 0:
        return None
    L = report.num_layers
    kv = report.kv
    if kv is not None and _int(kv.attrs.get("num_layers"), L) != L:
        kv = None  # a table of another shape: not this capture
    hkv = _int(kv.attrs.get("num_kv_heads")) if kv is not None else None
    hkv = hkv or _int(cap.get("num_kv_heads"))
    if not hkv:
        return None
    bpt = kv.attrs.get("bytes_per_token_per_layer") if kv is not None else None
    if isinstance(bpt, (int, float)) and not isinstance(bpt, bool) and bpt > 0:
        bpt = float(bpt)
        dtype = str(kv.attrs.get("kv_dtype", "bf16"))
        bytes_source = "/kv attribute bytes_per_token_per_layer"
    else:
        head_dim = _int(cap.get("head_dim")) or 0   # 0: only kv_resident_bytes can price the selectors
        v_dim = _int(cap.get("v_head_dim"), head_dim) or head_dim
        bpt = float(hkv * (head_dim + v_dim) * 2)
        dtype = "bf16"
        bytes_source = "2 x num_kv_heads x head_dim x 2 bytes (bf16, from /capture)"
    full_formula = float(T) * bpt * L
    full_kv, full_source = full_formula, "formula"
    if kv is not None:
        j = kv.context_index(T)
        full_row = kv.full_attention_bytes()
        if j is not None and full_row is not None:
            full_kv = float(full_row[j]) / kv.batch
            full_source = (f"/kv/full_attention_bytes[:, {T}]" if kv.has("full_attention_bytes")
                           else f"/kv/resident_bytes[full, {T}]")
    if report.kv_full_bytes is not None and report.kv_full_bytes > 0:
        full_kv, full_source = float(report.kv_full_bytes), "/selectors attribute kv_full_bytes"
    acc = KvAccounting(seq_len=T, num_layers=L, num_kv_heads=hkv, bytes_per_token_per_layer=bpt, dtype=dtype,
                       bytes_source=bytes_source, full_kv_bytes=full_kv, full_source=full_source)
    per_head = bpt / hkv
    NB = len(report.budgets)
    for label, s in report.selectors.items():
        meta = s.attrs.get("kv_metadata_bytes_per_token_per_kv_head", 0.0)
        meta = float(meta) if isinstance(meta, (int, float)) and not isinstance(meta, bool) else 0.0
        residency = str(s.attrs.get("kv_residency", ""))
        resident = s.get("kv_resident_bytes")
        if resident is not None:  # the one source of truth: the C++ footprint table, as the replay ran it
            acc.selectors[label] = SelectorKv(label=label, resident_bytes=resident.values, source="report",
                                              origin=resident.path, residency=residency, metadata_per_token=meta)
            continue
        # FALLBACK (older reports without kv_resident_bytes): re-derived from the selector attributes.
        if bpt <= 0:
            acc.skipped[label] = "no kv_resident_bytes and no K/V size (head_dim) to re-derive it"
            continue
        rule = _rule(s)
        if rule is None:
            acc.skipped[label] = (f"kv_residency {s.attrs.get('kv_residency')!r} is not known to this analysis package"
                                  if "kv_residency" in s.attrs else "the report has no KV attributes for it")
            continue
        tokens = np.zeros(NB, dtype=np.float64)   # per layer and KV head, summed
        source = "formula"
        kv_bytes: Optional[np.ndarray] = None
        if rule == "full":
            tokens[:] = float(T) * L * hkv
            kv_bytes = np.full(NB, full_kv)
            source = full_source
        elif rule == "hybrid":
            w = max(s.window, 0) + max(s.sinks, 0)
            per = np.where(s.is_full_layer, T, min(T, w)).astype(np.float64)
            tokens[:] = float(per.sum()) * hkv
            found = _kv_hybrid_bytes(report, s, T) if kv is not None else None
            if found is not None:
                kv_bytes = np.full(NB, found[0])
                source = found[1]
            elif kv is not None and kv.method_index("hysparse") is not None:
                source = "formula (the /kv hysparse row has another window, sinks or schedule)"
        elif rule == "window":
            for bi in range(NB):
                w = budget_tokens_at(report, bi, s.block_size, T - 1) if s.window_is_budget else max(s.window, 0)
                tokens[bi] = float(min(T, w + max(s.sinks, 0))) * L * hkv
        elif rule == "evict":
            fp = str(s.attrs.get("kv_footprint", s.name))
            if fp == "snapkv":
                rule = "evict-prompt"
            forced = max(s.sinks, 0) + (max(s.window, 0) if not s.window_is_budget else 0)
            for bi in range(NB):
                if fp == "snapkv":
                    # The compressed prompt (capacity C at the prompt's last row, observation window
                    # included) plus every key after the prompt (README: "later keys appended").
                    P = _int(s.attrs.get("first_scored_position"), 0) or 0
                    observe = min(_int(s.params.get("observe"), 32) or 0, P)
                    cap_c = budget_tokens_at(report, bi, 1, max(P - 1, 0))
                    kept = min(max(cap_c - observe, 0), P - observe) + (T - P + observe)
                elif fp == "h2o":
                    # The cache C includes the current key (capacity at row t: blocks_for_row(t + 1, 1)).
                    kept = budget_tokens_at(report, bi, 1, T)
                else:
                    kept = budget_tokens_at(report, bi, s.block_size, T - 1)
                tokens[bi] = float(min(T, kept + forced)) * L * hkv
        elif rule == "head-split":
            sinks = _int(s.params.get("sinks"), max(s.sinks, 0)) or 0
            recent = _int(s.params.get("recent"), _int(s.params.get("window"), 0)) or 0
            pct = _int(s.params.get("streaming"), 50)
            heads = L * hkv
            streaming = heads * int(pct) // 100
            tokens[:] = float(streaming * min(T, sinks + recent) + (heads - streaming) * T)
        if kv_bytes is None:
            kv_bytes = tokens * per_head
        meta_bytes = meta * tokens
        acc.selectors[label] = SelectorKv(label=label, resident_bytes=kv_bytes + meta_bytes, source="fallback",
                                          origin=source, residency=residency, metadata_per_token=meta, rule=rule,
                                          resident_tokens=tokens, kv_bytes=kv_bytes, metadata_bytes=meta_bytes)
    return acc if acc.selectors else None


def pareto_frontier(points: List[Tuple[Any, int, float, float]]) -> List[Tuple[Any, int, float, float]]:
    """The points (label, budget index, bytes, recall) no other point beats: none has fewer or equal
    bytes with higher or equal recall (one of the two strictly). Sorted by bytes; NaN points ignored;
    of several points with the same bytes and recall, the first one given is kept."""
    finite = [p for p in points if np.isfinite(p[2]) and np.isfinite(p[3])]
    finite.sort(key=lambda p: (p[2], -p[3]))  # stable: ties keep their order
    out: List[Tuple[Any, int, float, float]] = []
    best = -np.inf
    for p in finite:
        if p[3] > best:
            out.append(p)
            best = p[3]
    return out
