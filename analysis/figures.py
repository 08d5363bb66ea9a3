"""Paper-ready figures of a hysparse report.

Every builder takes a `Report` (never h5py) and returns a `Rendered` figure: the
matplotlib Figure, a title and caption, and `data`, the exact numbers it plotted
(so tests can hold them to the file). `save()` writes PNG and PDF (or SVG)
atomically with the report's provenance in a footer and in the file metadata.

Matplotlib is used through `matplotlib.figure.Figure` and the Agg canvas only:
no pyplot, no global figure state, no display needed.

Colours are fixed per selector label (`selector_style`): a family colour by the
spec's name (oracle black, hysparse vermillion, swa blue, ... from the
colour-blind-safe Okabe-Ito palette) and, for a second or third selector of the
same family (labels "oracle_2", "swa_3"), a lighter shade, another line style
and another marker. So `oracle` has the same colour in every figure and report.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import matplotlib
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import Bbox

from .kvbytes import RULE_TEXT, pareto_frontier, selector_kv
from .report import Report, Selector

__all__ = [
    "SINGLE_COLUMN_IN",
    "DOUBLE_COLUMN_IN",
    "FIGURES",
    "Rendered",
    "selector_style",
    "report_styles",
    "display_labels",
    "distance_from_full",
    "default_layer",
    "fig_recall_vs_budget",
    "fig_layer_heatmap",
    "fig_reuse_matrix",
    "fig_hysparse_distance",
    "fig_output_error",
    "fig_head_boxplot",
    "fig_kv_memory",
    "fig_recall_vs_kv",
    "method_styles",
    "bytes_label",
    "render_all",
    "save",
]

SINGLE_COLUMN_IN = 3.4
DOUBLE_COLUMN_IN = 7.0
FONT_PT = 8.0
PNG_DPI = 300

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": FONT_PT,
    "axes.titlesize": FONT_PT + 1,
    "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT,
    "ytick.labelsize": FONT_PT,
    "legend.fontsize": FONT_PT,
    "legend.title_fontsize": FONT_PT,
    "figure.titlesize": FONT_PT + 1,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "lines.linewidth": 1.3,
    "lines.markersize": 4.0,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.5,
    "legend.frameon": False,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "image.interpolation": "nearest",
}

# Okabe-Ito palette (colour-blind safe).
_FAMILY_COLOURS = {
    "oracle": "#000000",
    "hysparse": "#D55E00",
    "swa": "#0072B2",
    "quest": "#009E73",
    "h2o": "#CC79A7",
    "snapkv": "#E69F00",
    "streamingllm": "#56B4E9",
}
_FALLBACK_COLOURS = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99", "#999933", "#AA4499")
_FAMILY_MARKERS = {"oracle": "o", "hysparse": "s", "swa": "^", "quest": "D", "h2o": "v", "snapkv": "P"}
_FALLBACK_MARKERS = ("D", "v", "P", "X", "<", ">", "h", "*")
# Variants of one family (a second "oracle:group=sum" next to "oracle"): (lighten, line style).
_VARIANTS = (
    (0.0, "-"),
    (0.35, (0, (5, 2))),
    (0.55, (0, (5, 1.5, 1.5, 1.5))),
    (0.2, (0, (8, 2, 2, 2, 2, 2))),
    (0.45, (0, (9, 3))),
    (0.65, "-"),
)
_ALT_MARKERS = ("o", "^", "s", "D", "v", "P", "X")

BAND_NOTE = ("band: 10th to 50th percentile of per-row mass recall, pooled over all layers, heads and query rows "
             "(model_mass_recall_p10 / p50)")


def _stable_index(text: str, n: int) -> int:
    """A deterministic index (Python's hash() is salted per process)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % n


def _parse_label(label: str) -> Tuple[str, str, int]:
    """Selector label -> (family, parameters as written, repeat number).

    Labels are the selector's name ("oracle"), its spec as written when the name repeats
    ("oracle:group=sum"), either with "_2", "_3" when the same text repeats.
    """
    m = re.fullmatch(r"(.+?)_(\d+)", label)
    core, repeat = (m.group(1), int(m.group(2))) if m else (label, 1)
    family, _, params = core.partition(":")
    return family, params, repeat


def _preferred_variant(label: str) -> int:
    _, params, repeat = _parse_label(label)
    if not params and repeat == 1:
        return 0
    if not params:
        return 1 + (repeat - 2) % (len(_VARIANTS) - 1)
    return 1 + _stable_index(params if repeat == 1 else f"{params}_{repeat}", len(_VARIANTS) - 1)


def _lighten(colour: str, amount: float) -> str:
    rgb = np.array(mcolors.to_rgb(colour))
    return mcolors.to_hex(rgb + (1.0 - rgb) * amount)


def selector_style(label: str, variant: Optional[int] = None) -> Dict[str, Any]:
    """Fixed colour, marker and line style of a selector label, independent of the report.

    The family (the name before ':') fixes the colour (oracle black, hysparse vermillion, swa blue,
    others from a fixed palette by a stable hash of the name); the bare name gets that colour with a
    solid line, and a variant (parameters in the label, or a repeat suffix) a lighter shade, another
    dash pattern and marker, chosen by a stable hash of the label. `report_styles` resolves the rare
    clash of two variants of one family in the same report.
    """
    family, _, _ = _parse_label(label)
    k = _preferred_variant(label) if variant is None else variant
    base = _FAMILY_COLOURS.get(family) or _FALLBACK_COLOURS[_stable_index(family, len(_FALLBACK_COLOURS))]
    marker = _FAMILY_MARKERS.get(family) or _FALLBACK_MARKERS[_stable_index(family, len(_FALLBACK_MARKERS))]
    lighten, linestyle = _VARIANTS[k % len(_VARIANTS)]
    if k % len(_VARIANTS):
        alt = [mk for mk in _ALT_MARKERS if mk != marker]
        marker = alt[(k - 1) % len(alt)]
    return {"color": base if lighten == 0 else _lighten(base, lighten), "marker": marker, "linestyle": linestyle}


def report_styles(report: Report) -> Dict[str, Dict[str, Any]]:
    """Styles of every selector of a report: `selector_style`, with clashes inside a family moved on."""
    taken: Dict[str, set] = {}
    out: Dict[str, Dict[str, Any]] = {}
    for label in report.selectors:
        family, _, _ = _parse_label(label)
        used = taken.setdefault(family, set())
        k = _preferred_variant(label)
        while k in used and len(used) < len(_VARIANTS):
            k = 1 + k % (len(_VARIANTS) - 1) if k else 1
        used.add(k)
        out[label] = selector_style(label, k)
    return out


def display_labels(report: Report, multiline: bool = False) -> Dict[str, str]:
    """Legend / tick labels. A label that is a spec ("oracle:group=sum") stays as it is (split after
    the name when multiline); a bare name or "name_2" of a family with several members gets the
    spec parameters that tell the members apart, e.g. "oracle (group=none)" / "oracle\ngroup=none"."""
    families: Dict[str, List[Selector]] = {}
    for s in report.selectors.values():
        families.setdefault(s.name, []).append(s)
    out: Dict[str, str] = {}
    for label, s in report.selectors.items():
        family, params, repeat = _parse_label(label)
        if params:
            head = family + (f"_{repeat}" if repeat > 1 else "")
            out[label] = _wrap_params(head, params) if multiline else label
            continue
        members = families[s.name]
        keys: List[str] = []
        if len(members) > 1:
            all_keys = sorted(set().union(*(m.params for m in members)))
            keys = [k for k in all_keys if len({m.params.get(k, "") for m in members}) > 1]
        if not keys:
            out[label] = label
            continue
        extra = ",".join(f"{k}={s.params.get(k, '-')}" for k in keys)
        out[label] = _wrap_params(label, extra) if multiline else f"{label} ({extra})"
    return out


def _wrap_params(head: str, params: str, width: int = 18) -> str:
    lines = [head]
    current = ""
    for item in params.split(","):
        candidate = f"{current},{item}" if current else item
        if current and len(candidate) > width:
            lines.append(current)
            current = item
        else:
            current = candidate
    if current:
        lines.append(current)
    return "\n".join(lines)


def distance_from_full(is_full_layer: Sequence[bool]) -> np.ndarray:
    """Distance of each layer from the preceding full layer (0 for a full layer, -1 before the first one)."""
    full = np.asarray(is_full_layer, dtype=bool)
    out = np.full(full.size, -1, dtype=np.int64)
    last = -1
    for l, is_full in enumerate(full):
        if is_full:
            last = l
        if last >= 0:
            out[l] = l - last
    return out


def default_layer(report: Report) -> int:
    """The first layer where hysparse is sparse (so its recall is not trivially 1), else the middle layer."""
    hs = report.hysparse
    if hs is not None and hs.sparse_layers.size:
        return int(hs.sparse_layers[0])
    return report.num_layers // 2


@dataclass
class Rendered:
    """A built figure, not yet saved."""

    name: str                       # file stem, e.g. "recall_vs_budget"
    title: str
    caption: str
    figure: Figure
    data: Dict[str, Any] = field(default_factory=dict)
    paths: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------
# Layout helpers.
# ----------------------------------------------------------------------------

def _new_figure(report: Report, width: float, height: float) -> Tuple[Figure, float]:
    """A figure with a provenance footer; returns it and the footer's height as a figure fraction."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    text = "made from " + report.provenance_line()
    chars_per_line = max(int(width * 72 / (FONT_PT * 0.56)), 20)
    lines = textwrap.wrap(text, chars_per_line)
    fig.text(0.008, 0.006, "\n".join(lines), fontsize=FONT_PT, color="#555555", ha="left", va="bottom",
             linespacing=1.15, gid="footer")
    footer = (len(lines) * FONT_PT * 1.2 + 5) / 72.0 / height
    fig.set_layout_engine("constrained", rect=(0, footer, 1, 1 - footer), h_pad=0.03, w_pad=0.03)
    return fig, footer


def tokens_label(value: float) -> str:
    """Compact token count, as the CLI accepts it: 512, 1K, 128K, 1M (binary K and M)."""
    v = float(value)
    for div, suffix in ((1024.0 ** 2, "M"), (1024.0, "K")):
        if v >= div and (v / div) == int(v / div):
            return f"{int(v / div)}{suffix}"
    return f"{v:g}"


def _budget_axis(ax: Any, report: Report, log2_label: bool = True) -> np.ndarray:
    """Set the x axis for budgets; returns the x positions of the budgets."""
    b = report.budgets
    x = np.asarray(b.values, dtype=np.float64)
    if b.is_tokens:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x)
        ax.set_xticklabels([tokens_label(v) for v in x])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        lo, hi = float(np.min(x)), float(np.max(x))
        ax.set_xlim(lo / 2 ** 0.35, hi * 2 ** 0.35)
        ax.set_xlabel("budget k (tokens, log2 scale)")
    else:
        inside = bool(np.all((x > 0) & (x < 1)))
        if inside and x.size > 1:
            ax.set_xscale("logit")
            lo, hi = float(np.min(x)), float(np.max(x))
            span = np.log(hi / (1 - hi)) - np.log(lo / (1 - lo))
            pad = 0.08 * span if span > 0 else 0.5
            ax.set_xlim(1 / (1 + np.exp(-(np.log(lo / (1 - lo)) - pad))), 1 / (1 + np.exp(-(np.log(hi / (1 - hi)) + pad))))
            ax.set_xlabel("sparsity s (logit scale)")
        else:
            ax.set_xlabel("sparsity s")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    return x


def _legend_axes(fig: Figure, spec: Any, handles: List[Any], labels: List[str], ncol: int = 1,
                 loc: str = "center left") -> Any:
    lax = fig.add_subplot(spec)
    lax.set_axis_off()
    lax.legend(handles, labels, loc=loc, ncol=ncol, handlelength=2.6, borderaxespad=0.0, columnspacing=1.2)
    return lax


def _selector_handle(st: Dict[str, Any], band: bool = False) -> Any:
    line = Line2D([], [], color=st["color"], marker=st["marker"], linestyle=st["linestyle"])
    if band:
        return (Patch(facecolor=st["color"], alpha=0.18, linewidth=0), line)
    return line


def _sparse_handle(st: Dict[str, Any]) -> Line2D:
    return Line2D([], [], color=st["color"], marker=st["marker"], markerfacecolor="white", linestyle=(0, (1, 1)),
                  linewidth=1.0)


def _annotate_cells(ax: Any, values: np.ndarray, cmap: Any, norm: Any, fmt: Callable[[float], str]) -> None:
    for (i, j), v in np.ndenumerate(values):
        if not np.isfinite(v):
            continue
        r, g, b, _ = cmap(norm(v))
        luminance = 0.299 * r + 0.587 * g + 0.114 * b
        ax.text(j, i, fmt(v), ha="center", va="center", fontsize=FONT_PT,
                color="black" if luminance > 0.5 else "white")


def _short(v: float) -> str:
    if round(v, 2) >= 1.0:
        return "1"
    s = f"{v:.2f}"
    return s[1:] if s.startswith("0.") else s


def _finite_range(values: np.ndarray, default: Tuple[float, float] = (0.0, 1.0)) -> Tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return default
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    return lo, hi


# ----------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------

def fig_recall_vs_budget(report: Report) -> Rendered:
    """Model mean mass recall vs budget (a) and vs mean attended keys (b), per selector, with p10..p50 bands."""
    fig, _ = _new_figure(report, DOUBLE_COLUMN_IN, 3.0)
    gs = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 0.62])
    ax_a = fig.add_subplot(gs[0, 0])
    ax_b = fig.add_subplot(gs[0, 1], sharey=ax_a)
    x = _budget_axis(ax_a, report)
    data: Dict[str, Any] = {"x": x, "selectors": {}}
    handles, labels = [], []
    names = display_labels(report)
    styles = report_styles(report)
    all_keys = []
    for label, s in report.selectors.items():
        st = styles[label]
        mean = s.metric("mass_recall", "model")
        p10 = s.metric("mass_recall", "model", "p10")
        p50 = s.metric("mass_recall", "model", "p50")
        keys = s.metric("attended_keys", "model")
        entry = {"mean": mean, "p10": p10, "p50": p50, "attended_keys": keys}
        if p10 is not None and p50 is not None:
            ax_a.fill_between(x, p10, p50, color=st["color"], alpha=0.13, linewidth=0, gid=f"band:{label}")
        ax_a.plot(x, mean, gid=f"mean:{label}", **st)
        ax_b.plot(keys, mean, gid=f"keys:{label}", **st)
        all_keys.append(keys)
        handles.append(_selector_handle(st, band=p10 is not None))
        labels.append(names[label])
        if s.has_full_layers:
            sparse = s.metric("mass_recall", "model", sparse_layers=True)
            entry["mean_sparse_layers"] = sparse
            sst = dict(st, linestyle=(0, (1, 1)), linewidth=1.0, markerfacecolor="white")
            ax_a.plot(x, sparse, gid=f"sparse:{label}", **sst)
            handles.append(_sparse_handle(st))
            labels.append(f"{label}, sparse layers only")
        data["selectors"][label] = entry
    ax_a.set_ylim(0, 1.02)
    ax_a.set_ylabel("mass recall R (share of row mass kept)")
    ax_a.set_title("(a) vs budget", loc="left")
    ax_b.set_xscale("log", base=2)
    kmin, kmax = _finite_range(np.concatenate([np.ravel(k) for k in all_keys]), (1.0, 2.0))
    kmin = max(kmin, 1.0)
    lo_x, hi_x = kmin / 2 ** 0.3, kmax * 2 ** 0.3
    ax_b.set_xlim(lo_x, hi_x)
    ticks = [2.0 ** k for k in range(int(np.floor(np.log2(lo_x))), int(np.ceil(np.log2(hi_x))) + 1)
             if lo_x <= 2.0 ** k <= hi_x]
    if len(ticks) < 2:  # a narrow range: round numbers instead of powers of two
        ticks = [t for t in ticker.MaxNLocator(nbins=3).tick_values(lo_x, hi_x) if lo_x <= t <= hi_x and t > 0]
    ax_b.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax_b.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: tokens_label(v)))
    ax_b.xaxis.set_minor_locator(ticker.NullLocator())
    ax_b.set_xlabel("mean attended keys |A| (log2 scale)")
    ax_b.set_title("(b) vs keys actually attended", loc="left")
    ax_b.tick_params(labelleft=False)
    handles.append(Patch(facecolor="#888888", alpha=0.3, linewidth=0))
    labels.append("p10..p50 band (all rows)")
    _legend_axes(fig, gs[0, 2], handles, labels)
    budget_word = "token budget" if report.budgets.is_tokens else "sparsity"
    caption = (f"Model mean mass recall per selector (lines, markers) against the {budget_word} (a) and against the "
               f"mean number of keys each selector actually attends, forced window and sink keys included (b). "
               f"Shaded {BAND_NOTE}. Dotted lines with open markers: the mean over a hybrid selector's sparse "
               f"layers only (full layers have R = 1 and count in the solid line).")
    return Rendered("recall_vs_budget", "Mass recall vs budget", caption, fig, data)


def fig_layer_heatmap(report: Report, budget_index: Optional[int] = None) -> Rendered:
    """Per-layer x selector heatmap of mean mass recall at one budget; hysparse full layers marked."""
    bi = report.budgets.default_index() if budget_index is None else budget_index
    labels = list(report.selectors)
    L = report.num_layers
    matrix = np.array([report.selectors[l].metric("mass_recall", "layer")[bi] for l in labels], dtype=np.float64)
    names = display_labels(report, multiline=True)
    label_w = max(len(part) for s in labels for part in names[s].split("\n")) * FONT_PT * 0.6 / 72
    width = SINGLE_COLUMN_IN if label_w + 0.45 + 0.25 * L <= SINGLE_COLUMN_IN else DOUBLE_COLUMN_IN
    row_h = 0.34 if any("\n" in v for v in names.values()) else 0.24
    height = 1.95 + row_h * len(labels)
    fig, _ = _new_figure(report, width, height)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"]
    norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    im = ax.imshow(matrix, cmap=cmap, norm=norm, aspect="auto", gid="heatmap")
    ax.grid(False)
    cell_in = (width - label_w - 0.45) / max(L, 1)
    if cell_in >= 0.2:
        _annotate_cells(ax, matrix, cmap, norm, _short)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([names[l] for l in labels])
    step = 1 if L <= 16 else (2 if L <= 32 else 4)
    ax.set_xticks(range(0, L, step))
    ax.set_xlabel("layer")
    full_marked: Dict[str, List[int]] = {}
    styles = report_styles(report)
    for row, label in enumerate(labels):
        s = report.selectors[label]
        if s.name != "hysparse":
            continue
        full = [int(l) for l in s.full_layers]
        full_marked[label] = full
        for l in full:
            ax.add_patch(Rectangle((l - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=styles[label]["color"],
                                   linewidth=1.6, clip_on=False))
    hs = report.hysparse
    if hs is not None:
        for l in hs.full_layers:
            ax.plot([l], [-0.5], marker="v", color=styles[hs.label]["color"], markersize=5,
                    clip_on=False, linestyle="none", transform=ax.transData, gid="full-marker")
    ax.set_ylim(len(labels) - 0.5, -0.5)
    cb = fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.08, pad=0.02, aspect=40)
    cb.set_label("mean mass recall R")
    cb.outline.set_linewidth(0.5)
    blab = report.budgets.describe(bi)
    ax.set_title(f"Per-layer recall at {blab}", loc="left", pad=9)
    caption = (f"Mean mass recall of every layer (columns; mean over heads and query rows) for each selector (rows) at "
               f"{blab}. ")
    if hs is not None:
        caption += (f"Outlined cells and the triangles above the columns mark the full layers of {hs.label} "
                    f"(layers {', '.join(str(int(l)) for l in hs.full_layers)}), which attend to every key (R = 1).")
    data = {"budget_index": bi, "selectors": labels, "matrix": matrix, "full_layers": full_marked}
    return Rendered("layer_heatmap", "Per-layer mass recall", caption, fig, data)


def fig_reuse_matrix(report: Report) -> Optional[Rendered]:
    """Cross-layer reuse matrix (source layer f vs layer l), masked where f > l."""
    reuse = report.reuse
    if reuse is None:
        return None
    masked = reuse.masked()
    L = masked.shape[0]
    width = SINGLE_COLUMN_IN
    fig, _ = _new_figure(report, width, width * 0.93)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    lo, hi = _finite_range(masked.compressed())
    norm = mcolors.Normalize(vmin=lo, vmax=hi)
    im = ax.imshow(masked, cmap=cmap, norm=norm, aspect="equal", gid="reuse")
    ax.grid(False)
    if L <= 10:
        _annotate_cells(ax, masked.filled(np.nan), cmap, norm, _short)
    step = 1 if L <= 12 else (2 if L <= 20 else (4 if L <= 40 else 8))
    ax.set_xticks(range(0, L, step))
    ax.set_yticks(range(0, L, step))
    ax.set_xlabel("layer l (reuses the selection)")
    ax.set_ylabel("source layer f (selects the blocks)")
    used: List[Tuple[int, int]] = []
    hs = report.hysparse
    if hs is not None and hs.has_full_layers:
        dist = distance_from_full(hs.is_full_layer)
        for l in range(L):
            if dist[l] > 0:
                used.append((l - int(dist[l]), l))
        colour = report_styles(report)[hs.label]["color"]
        for f, l in used:
            ax.add_patch(Rectangle((l - 0.5, f - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=1.4))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("mean mass recall of layer l")
    cb.outline.set_linewidth(0.5)
    ax.set_title(f"Cross-layer reuse, {reuse.budget_tokens} tokens, block {reuse.block_size}", loc="left")
    caption = (f"Mean mass recall of layer l (column) when it attends to the blocks that layer f (row) selects by "
               f"HySparse's rule (block max probability, max over a KV group) at {reuse.budget_tokens} tokens and "
               f"block {reuse.block_size}, without forced keys; the diagonal is each layer's own block-max selection. "
               f"Blank: f > l (undefined). Colour range {lo:.3f} to {hi:.3f}.")
    if used:
        caption += f" Outlined: the (f, l) pairs that {hs.label}'s schedule uses."
    data = {"matrix": reuse.mass_recall, "used_pairs": used, "budget_tokens": reuse.budget_tokens,
            "block_size": reuse.block_size}
    return Rendered("reuse_matrix", "Cross-layer reuse matrix", caption, fig, data)


def fig_hysparse_distance(report: Report) -> Optional[Rendered]:
    """HySparse: recall (a) and recall vs oracle (b) against the distance from the preceding full layer."""
    hs = report.hysparse
    if hs is None or not hs.has_full_layers or hs.sparse_layers.size == 0:
        return None
    dist = distance_from_full(hs.is_full_layer)
    sparse = np.flatnonzero(dist > 0)
    distances = np.unique(dist[sparse])
    fig, _ = _new_figure(report, DOUBLE_COLUMN_IN, 2.9)
    gs = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 0.42])
    ax_a = fig.add_subplot(gs[0, 0])
    ax_b = fig.add_subplot(gs[0, 1])
    B = len(report.budgets)
    cmap = matplotlib.colormaps["viridis"]
    budget_colours = [cmap(0.85 * i / max(B - 1, 1)) for i in range(B)]
    rec = hs.metric("mass_recall", "layer")
    vso = hs.metric("recall_vs_oracle", "layer")
    data: Dict[str, Any] = {"distance": dist, "distances": distances, "mass_recall": {}, "recall_vs_oracle": {}}
    handles, labels = [], []
    spread = 0.06 * (np.arange(B) - (B - 1) / 2)
    for bi in range(B):
        c = budget_colours[bi]
        for ax, values, key in ((ax_a, rec, "mass_recall"), (ax_b, vso, "recall_vs_oracle")):
            means = np.array([np.mean(values[bi, sparse[dist[sparse] == d]]) for d in distances])
            data[key][report.budgets.labels[bi]] = means
            ax.scatter(dist[sparse] + spread[bi], values[bi, sparse], s=7, color=c, alpha=0.45, linewidths=0,
                       gid=f"layers:{key}:{report.budgets.labels[bi]}")
            ax.plot(distances, means, color=c, marker="o", gid=f"mean:{key}:{report.budgets.labels[bi]}")
        handles.append(Line2D([], [], color=budget_colours[bi], marker="o"))
        labels.append(report.budgets.describe(bi))
    handles.append(Line2D([], [], color="#777777", marker="o", linestyle="none", alpha=0.45, markersize=3))
    labels.append("single layers")
    for ax in (ax_a, ax_b):
        ax.set_xticks(distances)
        ax.set_xlim(distances.min() - 0.5, distances.max() + 0.5)
        ax.set_xlabel("distance from the preceding full layer (layers)")
    ax_a.set_ylabel("mean mass recall R of the sparse layer")
    ax_b.set_ylabel("recall / per-head oracle recall")
    ax_a.set_title(f"(a) mass recall, {hs.label}", loc="left")
    ax_b.set_title("(b) relative to the oracle", loc="left")
    lo, hi = _finite_range(rec[:, sparse])
    ax_a.set_ylim(max(0.0, lo - 0.05), min(1.02, hi + 0.05))
    lo, hi = _finite_range(vso[:, sparse])
    ax_b.set_ylim(max(0.0, lo - 0.05), min(1.02, hi + 0.03) if hi <= 1.0 else hi + 0.03)
    _legend_axes(fig, gs[0, 2], handles, labels)
    full = ", ".join(str(int(l)) for l in hs.full_layers)
    caption = (f"{hs.label} ({hs.spec}): per-layer mean mass recall of each sparse layer (a) and its ratio to the "
               f"per-head oracle with the same forced keys (b), against the layer's distance from the preceding full "
               f"layer whose selection it reuses (full layers: {full}). Lines: mean over the layers at that distance; "
               f"dots: single layers (spread sideways by budget).")
    return Rendered("hysparse_distance", "HySparse recall vs distance from the full layer", caption, fig, data)


def fig_output_error(report: Report) -> Optional[Rendered]:
    """Model mean relative output error vs budget per selector (only when the report has it)."""
    if not report.has_output_error:
        return None
    names = display_labels(report)
    entries = [names[l] for l in report.selectors] + [f"{l}, sparse layers" for l, s in report.selectors.items()
                                                      if s.has_full_layers]
    # Two legend columns when they fit the width (8 pt text is about 4.5 pt a character, plus the handle).
    column_in = (max(len(e) for e in entries) * FONT_PT * 0.57 + 3.4 * FONT_PT) / 72
    ncol = 2 if 2 * column_in <= SINGLE_COLUMN_IN - 0.1 else 1
    legend_rows = (len(entries) + ncol - 1) // ncol
    legend_h = (legend_rows * FONT_PT * 1.45 + 6) / 72
    fig, _ = _new_figure(report, SINGLE_COLUMN_IN, 2.5 + legend_h)
    gs = fig.add_gridspec(2, 1, height_ratios=[2.5 - 0.35, legend_h])
    ax = fig.add_subplot(gs[0, 0])
    x = _budget_axis(ax, report)
    data: Dict[str, Any] = {"x": x, "selectors": {}}
    handles, labels = [], []
    styles = report_styles(report)
    values = []
    for label, s in report.selectors.items():
        st = styles[label]
        err = s.metric("output_rel_error", "model")
        entry = {"mean": err}
        ax.plot(x, err, gid=f"mean:{label}", **st)
        values.append(err)
        handles.append(_selector_handle(st))
        labels.append(names[label])
        if s.has_full_layers:
            sparse = s.metric("output_rel_error", "model", sparse_layers=True)
            entry["mean_sparse_layers"] = sparse
            ax.plot(x, sparse, gid=f"sparse:{label}", **dict(st, linestyle=(0, (1, 1)), linewidth=1.0,
                                                               markerfacecolor="white"))
            values.append(sparse)
            handles.append(_sparse_handle(st))
            labels.append(f"{label}, sparse layers")
        data["selectors"][label] = entry
    v = np.concatenate([np.ravel(a) for a in values])
    if np.any(v[np.isfinite(v)] > 0):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda t, _: f"{t:g}"))
        finite = v[np.isfinite(v) & (v > 0)]
        decades = float(np.log10(finite.max() / finite.min()))

        def minor(t: float, _pos: Any) -> str:
            if t <= 0 or decades > 1.3:
                return ""
            mantissa = round(t / 10 ** np.floor(np.log10(t)), 6)
            return f"{t:g}" if mantissa in (2.0, 3.0, 5.0) else ""

        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))
    ax.set_ylabel("output error \u2016o_A \u2212 o\u2016 / \u2016o\u2016")
    ax.set_title("Output error vs budget", loc="left")
    _legend_axes(fig, gs[1, 0], handles, labels, ncol=ncol, loc="upper center")
    caption = ("Model mean of the per-row relative error of the attention output renormalised over the attended set, "
               "||o_A - o|| / ||o|| (log scale), per selector. Dotted lines with open markers: mean over a hybrid "
               "selector's sparse layers only (its full layers have zero error).")
    return Rendered("output_error", "Output error vs budget", caption, fig, data)


def _boxplot_horizontal(ax: Any, data: List[np.ndarray], **kwargs: Any) -> Dict[str, Any]:
    """Horizontal boxplot across matplotlib versions ('vert' gives way to 'orientation' in 3.10+)."""
    try:
        params = inspect.signature(ax.boxplot).parameters
    except (TypeError, ValueError):
        params = {}
    if "orientation" in params:
        return ax.boxplot(data, orientation="horizontal", **kwargs)
    return ax.boxplot(data, vert=False, **kwargs)


def fig_head_boxplot(report: Report, layer: Optional[int] = None, budget_index: Optional[int] = None) -> Rendered:
    """Per-head distribution (box plot over query heads) of mean mass recall, one layer, one budget."""
    bi = report.budgets.default_index() if budget_index is None else budget_index
    li = default_layer(report) if layer is None else layer
    labels = list(report.selectors)
    per_head = {l: np.asarray(report.selectors[l].metric("mass_recall", "head")[bi, li, :]) for l in labels}
    names = display_labels(report, multiline=True)
    row_h = 0.36 if any("\n" in v for v in names.values()) else 0.26
    fig, _ = _new_figure(report, SINGLE_COLUMN_IN, 1.45 + row_h * len(labels))
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(1, len(labels) + 1)
    bp = _boxplot_horizontal(ax, [per_head[l] for l in labels], positions=positions, widths=0.6, patch_artist=True,
                             showfliers=False, medianprops={"color": "black", "linewidth": 1.0},
                             whiskerprops={"linewidth": 0.8}, capprops={"linewidth": 0.8})
    H = report.num_heads
    styles = report_styles(report)
    offsets = (np.arange(H) - (H - 1) / 2) / max(H, 1) * 0.4
    for i, (label, box) in enumerate(zip(labels, bp["boxes"])):
        st = styles[label]
        box.set_facecolor(mcolors.to_rgba(st["color"], 0.22))
        box.set_edgecolor(st["color"])
        box.set_gid(f"box:{label}")
        ax.scatter(per_head[label], positions[i] + offsets, s=10, color=st["color"], marker=st["marker"],
                   zorder=3, linewidths=0, gid=f"heads:{label}")
    ax.set_yticks(positions)
    ax.set_yticklabels([names[l] for l in labels])
    ax.set_ylim(len(labels) + 0.6, 0.4)
    lo, hi = _finite_range(np.concatenate(list(per_head.values())))
    ax.set_xlim(max(0.0, lo - 0.04), min(1.02, hi + 0.04))
    ax.set_xlabel("mean mass recall R of one query head")
    blab = report.budgets.describe(bi)
    ax.set_title(f"Layer {li}, {blab}: {H} query heads", loc="left")
    ax.grid(axis="y", visible=False)
    full_note = ""
    hs = report.hysparse
    if hs is not None and hs.is_full_layer[li]:
        full_note = f" Layer {li} is a full layer of {hs.label} (R = 1 for every head)."
    caption = (f"Distribution over the {H} query heads of layer {li} of each head's mean mass recall (mean over query "
               f"rows) at {blab}: box from the first to the third quartile, line at the median, whiskers to the most "
               f"extreme head within 1.5 IQR; dots are the single heads (head 0 on top).{full_note}")
    data = {"layer": li, "budget_index": bi, "per_head": per_head}
    return Rendered("head_boxplot", "Per-head recall distribution", caption, fig, data)


# ----------------------------------------------------------------------------
# KV-cache figures.
# ----------------------------------------------------------------------------

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_METHOD_STYLES = {
    "full": {"color": "#000000", "marker": "o", "linestyle": (0, (5, 2))},
    "native": {"color": "#999999", "marker": "x", "linestyle": "-"},
    "hybrid-swa": {"color": "#0072B2", "marker": "^", "linestyle": (0, (5, 1.5, 1.5, 1.5))},
    "hysparse": {"color": "#D55E00", "marker": "s", "linestyle": "-"},
}
FULL_KV_COLOUR = "#777777"


def bytes_label(value: float) -> str:
    """Bytes in binary units, compact: 1536 -> "1.5 KiB", 8388608 -> "8 MiB"."""
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        return f"{v:g} B"
    u = min(int(np.floor(np.log2(v) / 10)), len(_BINARY_UNITS) - 1) if v >= 1024 else 0
    x = v / 1024.0 ** u
    text = f"{x:.0f}" if abs(x - round(x)) < 1e-9 else (f"{x:.3g}" if x < 100 else f"{x:.0f}")
    return f"{text} {_BINARY_UNITS[u]}"


def _log2_bytes_axis(axis: Any, lo: float, hi: float, max_ticks: int = 6) -> Tuple[float, float]:
    """A log2 bytes axis from lo to hi (padded): ticks at powers of two in binary units. Returns the limits."""
    lo2, hi2 = np.log2(lo), np.log2(hi)
    pad = max(0.25, 0.06 * (hi2 - lo2))
    lo2, hi2 = lo2 - pad, hi2 + pad
    span = int(np.ceil(hi2) - np.floor(lo2))
    step = next((k for k in (1, 2, 3, 5, 10, 20, 30) if span / k <= max_ticks - 1), 40)
    first = int(np.ceil(lo2 / step) * step)
    ticks = [2.0 ** e for e in range(first, int(np.floor(hi2)) + 1, step)]
    if len(ticks) < 2:  # a narrow range: every power of two inside
        ticks = [2.0 ** e for e in range(int(np.ceil(lo2)), int(np.floor(hi2)) + 1)]
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: bytes_label(v)))
    axis.set_minor_locator(ticker.NullLocator())
    axis.set_minor_formatter(ticker.NullFormatter())
    return 2.0 ** lo2, 2.0 ** hi2


def method_styles(methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Fixed styles of KV-accounting methods: full black dashed, hysparse vermillion, hybrid-swa blue
    dash-dot, native grey; the rest as the selector of the same name (quest green, h2o pink, ...)."""
    out: Dict[str, Dict[str, Any]] = {}
    seen = set()
    for m in methods:
        st = dict(_METHOD_STYLES.get(m) or selector_style(m))
        k = 1
        while (st["color"], str(st["linestyle"]), st["marker"]) in seen and k < len(_VARIANTS):
            st = selector_style(m, k)
            k += 1
        seen.add((st["color"], str(st["linestyle"]), st["marker"]))
        out[m] = st
    return out


def _spread_labels(y: List[float], gap: float) -> List[float]:
    """Positions near y (same order) with at least `gap` between neighbours: pushed apart upwards,
    then the whole stack moved back so that on average the labels sit at their points."""
    if not y:
        return []
    yv = np.asarray(y, dtype=np.float64)
    order = np.argsort(yv, kind="stable")
    placed = yv[order].copy()
    for i in range(1, placed.size):
        placed[i] = max(placed[i], placed[i - 1] + gap)
    placed -= float(np.mean(placed - yv[order]))
    out = np.empty_like(placed)
    out[order] = placed
    return out.tolist()


def fig_kv_memory(report: Report) -> Optional[Rendered]:
    """KV-cache memory vs context length per method (log-log), with the ratio to full attention at the largest context."""
    kv = report.kv
    if kv is None or not kv.has("resident_bytes") or kv["resident_bytes"].ndim != 2:
        return None
    resident = np.asarray(kv["resident_bytes"], dtype=np.float64)
    ctx = np.asarray(kv.contexts, dtype=np.float64)
    order = np.argsort(ctx)
    ctx, resident = ctx[order], resident[:, order]
    full = kv.full_attention_bytes()
    full = None if full is None else np.asarray(full, dtype=np.float64)[order]
    if kv.has("ratio_to_full") and kv["ratio_to_full"].ndim == 2:
        ratio = np.asarray(kv["ratio_to_full"], dtype=np.float64)[:, order]
        ratio_source = "ratio_to_full"
    elif full is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = full[None, :] / resident
        ratio_source = "full_attention_bytes / resident_bytes"
    else:
        ratio, ratio_source = None, ""
    with np.errstate(invalid="ignore"):
        positive = resident[np.isfinite(resident) & (resident > 0)]
    values = [positive] + ([full[np.isfinite(full) & (full > 0)]] if full is not None else [])
    allv = np.concatenate(values)
    if allv.size == 0:
        return None  # nothing positive to draw on log axes
    methods = list(kv.methods)
    styles = method_styles(methods + ([] if "full" in methods else ["full"]))
    # Legend below the axes, two columns when they fit.
    entries = methods + ([] if "full" in methods or full is None else ["full attention (every layer full)"])
    column_in = (max(len(e) for e in entries) * FONT_PT * 0.57 + 3.4 * FONT_PT) / 72
    ncol = 2 if 2 * column_in <= SINGLE_COLUMN_IN - 0.1 else 1
    legend_h = (((len(entries) + ncol - 1) // ncol) * FONT_PT * 1.45 + 6) / 72
    plot_h = 2.55
    fig, _ = _new_figure(report, SINGLE_COLUMN_IN, plot_h + legend_h)
    gs = fig.add_gridspec(2, 1, height_ratios=[plot_h - 0.35, legend_h])
    ax = fig.add_subplot(gs[0, 0])
    data: Dict[str, Any] = {"contexts": ctx, "methods": {}, "full_attention_bytes": full, "ratio_at_largest": {},
                            "largest_context": float(ctx[-1])}
    handles, labels = [], []
    for i, m in enumerate(methods):
        st = dict(styles[m])
        y = resident[i]
        # A method with the same sizes as earlier ones is drawn thinner on top of them, so both show.
        same = sum(1 for k in range(i) if np.array_equal(resident[k], y))
        if same:
            st.update(linewidth=max(1.3 - 0.45 * same, 0.5), markersize=max(4.0 - 1.4 * same, 1.5))
        z = 2.0 + same + (1.5 if m == "full" else 0.0)
        ax.plot(ctx, np.where(y > 0, y, np.nan), gid=f"kv:{m}", zorder=z, **st)
        data["methods"][m] = y
        handles.append(_selector_handle(st))
        labels.append(m)
    if full is not None and "full" not in methods:
        st = styles["full"]
        ax.plot(ctx, full, gid="kv:full-attention", zorder=3.5, **st)
        handles.append(_selector_handle(st))
        labels.append("full attention (every layer full)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    # x: the contexts, room on the right for the ratio labels.
    lo_x, hi_x = float(ctx[0]), float(ctx[-1])
    span2 = max(np.log2(hi_x / lo_x), 1.0)
    ax.set_xlim(lo_x / 2 ** (0.06 * span2 + 0.1), hi_x * 2 ** (0.2 * span2 + 1.0))
    ax.set_xticks(ctx)
    ax.set_xticklabels([tokens_label(v) for v in ctx])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if ctx.size > 6:  # keep the tick labels apart
        for t in ax.get_xticklabels()[1::2]:
            t.set_visible(False)
    ylo, yhi = _log2_bytes_axis(ax.yaxis, float(allv.min()), float(allv.max()))
    ax.set_ylim(ylo, yhi)
    ax.set_xlabel("context length T (tokens, log2 scale)")
    ax.set_ylabel("resident KV cache (log2 scale)")
    ax.set_title(f"KV cache vs context, {kv.attrs.get('model', report.capture.get('model', '?'))}", loc="left")
    # Ratio to full attention at the largest context: one label per distinct resident size.
    if ratio is not None:
        groups: Dict[float, List[int]] = {}
        for i, m in enumerate(methods):
            if m == "full" or not np.isfinite(resident[i, -1]) or resident[i, -1] <= 0:
                continue
            groups.setdefault(float(resident[i, -1]), []).append(i)
        ys = list(groups)
        axes_h_pt = (plot_h - 0.9) * 72
        gap = 9.5 / axes_h_pt * (np.log2(yhi) - np.log2(ylo))
        placed = _spread_labels([float(np.log2(y)) for y in ys], gap)
        for y, y2 in zip(ys, placed):
            members = groups[y]
            r = float(ratio[members[0], -1])
            for i in members:
                data["ratio_at_largest"][methods[i]] = float(ratio[i, -1])
            colour = styles[methods[members[0]]]["color"] if len(members) == 1 else "#333333"
            ax.annotate(f"{r:.3g}x", xy=(hi_x, y), xytext=(hi_x * 2 ** (0.06 * span2 + 0.15), 2.0 ** y2),
                        textcoords="data", ha="left", va="center", fontsize=FONT_PT, color=colour,
                        arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.5, "shrinkA": 0, "shrinkB": 2},
                        gid="ratio:" + ",".join(methods[i] for i in members))
    _legend_axes(fig, gs[1, 0], handles, labels, ncol=ncol, loc="upper center")
    batch = kv.batch
    dtype = kv.attrs.get("kv_dtype", "?")
    model = kv.attrs.get("model_description") or kv.attrs.get("model", "?")
    where = "the report's /kv table (the replayed model shape)" if not report.is_kv_report else "the KV report"
    caption = (f"Resident KV cache (K and V plus each method's resident metadata, {dtype}, batch {batch}: "
               f"resident_bytes) against the context length, log-log, per method, from {where}: {model}. ")
    if full is not None:
        caption += ("Black dashed: full attention (every layer keeps every token). " if "full" in methods else
                    "Black dashed: full attention (full_attention_bytes). ")
    if ratio is not None:
        caption += (f"Numbers at the right: full-attention bytes / resident bytes ({ratio_source}) at "
                    f"{tokens_label(ctx[-1])} tokens (x > 1: smaller than full attention)")
        if any(len(g) > 1 for g in groups.values()):
            caption += "; a grey number stands for several methods with the same size"
        caption += ". "
    same_as = [m for i, m in enumerate(methods) if any(np.array_equal(resident[k], resident[i]) for k in range(i))]
    if same_as:
        caption += (f"Thinner on top: {', '.join(same_as)}, the same sizes as a method drawn before "
                    f"(the lines coincide). ")
    caption += "Binary units (KiB = 1024 B; K = 1024 tokens)."
    data["coincident"] = same_as
    return Rendered("kv_memory", "KV-cache memory vs context", caption, fig, data)


_LABEL_OFFSETS = ((6, -11), (6, 4), (-6, 4), (-6, -11), (0, 8), (0, -15), (10, -4), (-10, -4))


def place_point_labels(fig: Figure, ax: Any, items: Sequence[Tuple[str, float, float, str]],
                       avoid: Optional[np.ndarray] = None) -> List[Optional[Tuple[int, int]]]:
    """Short labels (text, x, y, gid) next to circled points (a Pareto frontier), in data coordinates.

    Each label goes to the first of eight offsets around its point where the drawn text (padded by 5 pt
    sideways) stays inside the axes and overlaps no label placed before, no circled point (5.5 pt) and no
    point of `avoid` ([n, 2] data coordinates, 3 pt); a point without such a place gets no label. Returns
    the offset (points) of each label, or None."""
    fig.canvas.draw()  # the final layout, so that data -> pixels holds
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    scale = fig.dpi / 72.0
    centres = [(ax.transData.transform((x, y)), 5.5 * scale) for _, x, y, _ in items]
    if avoid is not None and np.size(avoid):
        a = np.asarray(avoid, dtype=np.float64).reshape(-1, 2)
        a = a[np.all(np.isfinite(a), axis=1) & (a[:, 0] > 0 if ax.get_xscale() == "log" else True)]
        centres += [(p, 3.0 * scale) for p in ax.transData.transform(a)] if a.size else []
    placed: List[Any] = []
    out: List[Optional[Tuple[int, int]]] = []
    for text, x, y, gid in items:
        t = ax.annotate(text, xy=(x, y), xytext=_LABEL_OFFSETS[0], textcoords="offset points", va="bottom",
                        fontsize=FONT_PT, color="#555555", gid=gid)
        choice = None
        for dx, dy in _LABEL_OFFSETS:
            t.set_position((dx, dy))
            t.set_horizontalalignment("right" if dx < 0 else ("center" if dx == 0 else "left"))
            tight = t.get_window_extent(renderer)
            box = Bbox.from_extents(tight.x0 - 5 * scale, tight.y0 - scale, tight.x1 + 5 * scale, tight.y1 + scale)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clear = not any(box.overlaps(b) for b in placed) and not any(
                box.x0 - r < px < box.x1 + r and box.y0 - r < py < box.y1 + r for (px, py), r in centres)
            if inside and clear:
                choice = (dx, dy)
                placed.append(box)
                break
        out.append(choice)
        if choice is None:
            t.remove()
    return out


def fig_recall_vs_kv(report: Report) -> Optional[Rendered]:
    """Pareto view: model mean recall of each selector at each budget vs the KV bytes it keeps per sequence."""
    acc = selector_kv(report)
    if acc is None:
        return None
    names = display_labels(report)
    styles = report_styles(report)
    fig, _ = _new_figure(report, DOUBLE_COLUMN_IN, 3.1)
    gs = fig.add_gridspec(1, 2, width_ratios=[1.0, 0.42])
    ax = fig.add_subplot(gs[0, 0])
    data: Dict[str, Any] = {"seq_len": acc.seq_len, "full_kv_bytes": acc.full_kv_bytes, "selectors": {},
                            "bytes_per_token_per_layer": acc.bytes_per_token_per_layer, "skipped": dict(acc.skipped)}
    handles, labels = [], []
    points: List[Tuple[str, int, float, float]] = []
    all_x, all_y = [acc.full_kv_bytes], []
    for label, s in report.selectors.items():
        sk = acc.selectors.get(label)
        if sk is None:
            continue
        st = styles[label]
        recall = s.metric("mass_recall", "model")
        x = sk.total_bytes
        ax.plot(x, recall, gid=f"kv:{label}", **st)
        data["selectors"][label] = {"bytes": x, "kv_bytes": sk.kv_bytes, "metadata_bytes": sk.metadata_bytes,
                                    "resident_tokens": sk.resident_tokens, "recall": recall, "rule": sk.rule,
                                    "source": sk.source, "origin": sk.origin}
        points += [(label, bi, float(x[bi]), float(recall[bi])) for bi in range(len(report.budgets))]
        all_x += list(x[np.isfinite(x)])
        all_y += list(recall[np.isfinite(recall)])
        handles.append(_selector_handle(st))
        labels.append(names[label])
    frontier = pareto_frontier(points)
    data["frontier"] = [(lab, report.budgets.labels[bi], xb, yr) for lab, bi, xb, yr in frontier]
    if frontier:
        fx = [p[2] for p in frontier]
        fy = [p[3] for p in frontier]
        ax.step(fx, fy, where="post", color="#555555", linewidth=0.9, alpha=0.8, zorder=1, gid="frontier")
        ax.plot(fx, fy, linestyle="none", marker="o", markersize=9, markerfacecolor="none", markeredgecolor="#555555",
                markeredgewidth=0.9, zorder=4, gid="frontier-points")
        handles.append(Line2D([], [], color="#555555", linewidth=0.9, marker="o", markersize=9, markerfacecolor="none"))
        labels.append("Pareto frontier (budget\nnext to it where room)")
    ax.axvline(acc.full_kv_bytes, color=FULL_KV_COLOUR, linestyle=":", linewidth=1.0, zorder=0, gid="full-kv")
    handles.append(Line2D([], [], color=FULL_KV_COLOUR, linestyle=":", linewidth=1.0))
    labels.append(f"full KV ({bytes_label(acc.full_kv_bytes)})")
    ax.set_xscale("log", base=2)
    lo, hi = _log2_bytes_axis(ax.xaxis, float(min(all_x)), float(max(all_x)), max_ticks=7)
    ax.set_xlim(lo, hi)
    ylo, yhi = _finite_range(np.array(all_y))
    ax.set_ylim(max(0.0, ylo - 0.05), min(1.02, yhi + 0.04) if yhi <= 1.0 else yhi + 0.04)
    if frontier:  # after the axes limits: labels where they fit
        items = [(report.budgets.labels[bi], xb, yr, f"frontier-label:{lab}:{bi}") for lab, bi, xb, yr in frontier]
        avoid = np.array([(p[2], p[3]) for p in points], dtype=np.float64)
        data["frontier_label_offsets"] = place_point_labels(fig, ax, items, avoid)
    ax.set_xlabel(f"KV bytes kept per sequence at T = {tokens_label(acc.seq_len)} tokens (log2 scale)")
    ax.set_ylabel("mass recall R (model mean)")
    ax.set_title("Recall vs KV memory", loc="left")
    _legend_axes(fig, gs[0, 1], handles, labels)
    caption = _recall_vs_kv_caption(report, acc) + (
        f" Dotted: full attention's K/V ({bytes_label(acc.full_kv_bytes)}, {acc.full_source}). "
        "Circled and joined by the grey staircase: the Pareto frontier, the points that no other selector "
        "or budget beats with at least the same recall for no more bytes, labelled with the budget where the "
        "label fits.")
    if acc.skipped:
        caption += " Not priced: " + "; ".join(f"{l} ({why})" for l, why in acc.skipped.items()) + "."
    return Rendered("recall_vs_kv", "Recall vs KV memory (Pareto)", caption, fig, data)


def _recall_vs_kv_caption(report: Report, acc: Any) -> str:
    """What the x axis of recall_vs_kv counts: the report's kv_resident_bytes, or (older reports) the fallback."""
    budget_word = "token budget" if report.budgets.is_tokens else "sparsity"
    text = (f"Model mean mass recall (over all layers, heads and query rows) of each selector at each {budget_word} "
            f"against the KV cache it keeps resident for one sequence at the capture's length T = {acc.seq_len} "
            "tokens. ")
    ours = acc.from_report()
    if ours:
        kinds: Dict[str, List[str]] = {}
        for label in ours:
            kinds.setdefault(acc.selectors[label].residency or "?", []).append(label)
        text += ("KV bytes as the replay priced them from hysparse's footprint table (kv_resident_bytes: K and V "
                 "in bf16 plus the selector's resident metadata, whole model, batch 1)"
                 + ("" if len(ours) == len(acc.selectors) else f" for {', '.join(ours)}") + "; what is kept: "
                 + "; ".join(f"{', '.join(m)}: {r}" for r, m in kinds.items()) + ". ")
    fallback = acc.from_fallback()
    if fallback:
        by_rule: Dict[str, List[str]] = {}
        for label in fallback:
            by_rule.setdefault(acc.selectors[label].rule, []).append(label)
        parts = []
        for rule in RULE_TEXT:
            if rule not in by_rule:
                continue
            members = by_rule[rule]
            srcs = sorted({acc.selectors[l].origin for l in members})
            src = "" if srcs == ["formula"] else f" [{'; '.join(srcs)}]"
            parts.append(f"{', '.join(members)}: {RULE_TEXT[rule]}{src}")
        meta = [f"{l} {acc.selectors[l].metadata_per_token:g} B" for l in fallback
                if acc.selectors[l].metadata_per_token > 0]
        text += ("Re-derived by the analysis package (FALLBACK for a report written before kv_resident_bytes): "
                 f"when the last token is decoded, K and V in {acc.dtype} at {acc.bytes_per_token_per_layer:g} B "
                 f"per token per layer ({acc.bytes_source}; {acc.num_layers} layers x {acc.num_kv_heads} KV heads), "
                 "counting per layer and KV head: " + "; ".join(parts) + ". Plus resident metadata = "
                 "kv_metadata_bytes_per_token_per_kv_head x resident tokens x KV heads x layers"
                 + (f" ({', '.join(meta)} per token per KV head)" if meta else " (none of these selectors has any)")
                 + ". Not counted here: activations, transient selection state (block scores, top-k indices), "
                 "fixed-size gates (the report's own kv_resident_bytes, where present, include duo's gates). ")
    else:
        text += ("Not counted: activations and transient selection state (block scores, top-k indices); "
                 "fixed-size metadata (e.g. duo's per-head gates) is, as the footprint table declares it. ")
    return text.rstrip()


# name -> (builder, needs budget, needs layer)
FIGURES: Dict[str, Callable[..., Optional[Rendered]]] = {
    "recall_vs_budget": fig_recall_vs_budget,
    "layer_heatmap": fig_layer_heatmap,
    "reuse_matrix": fig_reuse_matrix,
    "hysparse_distance": fig_hysparse_distance,
    "output_error": fig_output_error,
    "head_boxplot": fig_head_boxplot,
    "kv_memory": fig_kv_memory,
    "recall_vs_kv": fig_recall_vs_kv,
}

# The figures a KV-accounting report ('hysparse kv -o': no selectors) can have.
KV_REPORT_FIGURES = ("kv_memory",)

SKIP_REASONS = {
    "reuse_matrix": "the report has no /reuse matrix (replayed with --reuse-budget 0)",
    "hysparse_distance": "the report has no hysparse selector with both full and sparse layers",
    "output_error": "the report has no output_rel_error (capture without v, or --no-output-error)",
    "kv_memory": "the report has no KV accounting (/kv group with resident_bytes)",
    "recall_vs_kv": "the report's selectors have no KV attributes (kv_residency, evicts) or no sequence length",
}


# ----------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------

def _metadata(report: Report, rendered: Rendered, fmt: str) -> Dict[str, Any]:
    p = report.provenance
    prov = {k: p.get(k) for k in ("tool", "tool_version", "git_sha", "created_utc", "command_line", "input_files",
                                  "input_sha256") if k in p}
    prov["report"] = os.path.basename(report.path)
    creator = f"hysparse analysis (matplotlib {matplotlib.__version__})"
    if fmt == "png":
        return {"Title": rendered.title, "Description": rendered.caption, "Source": report.input_name,
                "Software": creator, "Comment": json.dumps(prov, sort_keys=True),
                "Creation Time": str(p.get("created_utc", ""))}
    if fmt == "pdf":
        return {"Title": rendered.title, "Subject": rendered.caption, "Creator": creator,
                "Keywords": json.dumps(prov, sort_keys=True), "CreationDate": None}
    if fmt == "svg":
        return {"Title": rendered.title, "Description": rendered.caption, "Source": report.input_name,
                "Creator": creator, "Keywords": [json.dumps(prov, sort_keys=True)], "Date": None}
    return {}


def save(rendered: Rendered, report: Report, out_dir: str, formats: Sequence[str] = ("png", "pdf")) -> List[str]:
    """Write the figure in each format atomically (temporary name, then os.replace)."""
    paths = []
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            final = os.path.join(out_dir, f"{rendered.name}.{fmt}")
            tmp = os.path.join(out_dir, f".{rendered.name}.{fmt}.tmp-{os.getpid()}")
            try:
                kwargs = {"dpi": PNG_DPI} if fmt == "png" else {}
                rendered.figure.savefig(tmp, format=fmt, metadata=_metadata(report, rendered, fmt), **kwargs)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            paths.append(final)
    rendered.paths = paths
    return paths


def build(report: Report, name: str, budget_index: Optional[int] = None,
          layer: Optional[int] = None) -> Optional[Rendered]:
    """Build one figure by name under the package style (None when the report lacks what it needs)."""
    builder = FIGURES[name]
    if report.is_kv_report and name not in KV_REPORT_FIGURES:
        return None  # a KV-accounting report has no selectors, budgets or layers to plot
    kwargs: Dict[str, Any] = {}
    if name in ("layer_heatmap", "head_boxplot"):
        kwargs["budget_index"] = budget_index
    if name == "head_boxplot":
        kwargs["layer"] = layer
    with matplotlib.rc_context(STYLE):
        return builder(report, **kwargs)


def render_all(report: Report, out_dir: str, budget_index: Optional[int] = None, layer: Optional[int] = None,
               formats: Sequence[str] = ("png", "pdf"), keep_figures: bool = False
               ) -> Tuple[List[Rendered], List[Tuple[str, str]]]:
    """Build and save every applicable figure. Returns (rendered, skipped as (name, reason))."""
    os.makedirs(out_dir, exist_ok=True)
    rendered, skipped = [], []
    for name in (KV_REPORT_FIGURES if report.is_kv_report else FIGURES):
        r = build(report, name, budget_index, layer)
        if r is None:
            skipped.append((name, SKIP_REASONS.get(name, "not applicable")))
            continue
        save(r, report, out_dir, formats)
        if not keep_figures:
            r.figure = None  # type: ignore[assignment]  # free memory
        rendered.append(r)
    return rendered, skipped
