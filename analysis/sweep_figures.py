"""Figures of a sweep report ('hysparse sweep', format hysparse-sweep).

Every builder takes a `SweepReport` (never h5py) and returns a `Rendered` figure, like the replay
figures in `figures.py`, whose style, colours, footer and `save()` they share:

- `sweep_recall_vs_sparsity`: pooled mass recall vs sparsity per selector instance, mean line with a
  p10..p50 band (the report has p10 and p50, not p90); x is the realised sparsity (token budgets) or
  the requested sparsity (sparsity budgets). Instances of one selector differ by colour shade, dashes
  and markers; when there are too many to tell apart, the panels split by the parameter axis that
  separates them best (facets), and every legend entry names the parameters that differ.
- `sweep_pareto`: pooled mass recall vs resident KV bytes (log2 x) of every point, the Pareto frontier
  over all of them circled and joined.
- `sweep_per_capture`: each instance's mass recall per capture (and pooled) at a few budgets, when the
  sweep has several captures.

An instance's legend text is its selector name and the parameters that differ between the instances
of that selector (e.g. "hysparse window=128 schedule=1:2"), plus the facet parameters when facets are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import matplotlib
from matplotlib import ticker
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .figures import (DOUBLE_COLUMN_IN, FONT_PT, FULL_KV_COLOUR, STYLE, Rendered, _VARIANTS, _finite_range,
                      _log2_bytes_axis, _new_figure, bytes_label, place_point_labels, save, selector_style,
                      tokens_label)
from .kvbytes import pareto_frontier
from .report import SWEEP_PARAM_AXES, SweepInstance, SweepReport, parse_spec

__all__ = ["SWEEP_FIGURES", "SweepLine", "sweep_lines", "fig_sweep_recall_vs_sparsity", "fig_sweep_pareto",
           "fig_sweep_per_capture", "fig_sweep_recall_vs_realised_sparsity", "build_sweep", "render_sweep",
           "budget_text", "realised_gaps", "SWEEP_BAND_NOTE"]

# At most this many instances share a panel (their p10..p50 bands stay readable, their legend fits).
MAX_LINES_PER_PANEL = 4
MAX_FIGURE_HEIGHT_IN = 7.9
SWEEP_BAND_NOTE = ("band: 10th to 50th percentile of per-row mass recall (mass_recall_p10 to mass_recall_p50; "
                   "the report has these two, not p90)")
_PARAM_ORDER = SWEEP_PARAM_AXES


@dataclass
class SweepLine:
    """One selector instance as the sweep figures draw it."""

    instance: SweepInstance
    rows: np.ndarray              # row indices of /sweep/points (pooled rows, sorted by budget)
    params: Dict[str, str]        # every parameter: the spec's and the axes' (block, window, sinks, schedule, group)
    label: str                    # legend text, unique in the figure
    style: Dict[str, Any]         # colour, marker, line style


def budget_text(report: SweepReport, value: float) -> str:
    return tokens_label(value) if report.budget_kind == "tokens" else f"s={value:g}"


def _params(inst: SweepInstance) -> Dict[str, str]:
    _, params = parse_spec(inst.spec)
    out = dict(params)
    for axis in _PARAM_ORDER:
        v = inst.param(axis)
        if v != "":
            out[axis] = v
        elif axis in ("schedule", "group"):
            out.pop(axis, None)
    return out


def _key_order(keys: Sequence[str]) -> List[str]:
    return [k for k in _PARAM_ORDER if k in keys] + sorted(k for k in keys if k not in _PARAM_ORDER)


def sweep_lines(report: SweepReport, rows: Optional[np.ndarray] = None,
                always: Sequence[str] = ()) -> List[SweepLine]:
    """The instances among `rows` (default: the pooled rows) with legend text and a fixed style each.

    Legend text: the selector name and the parameters whose values differ between the instances of that
    selector, plus `always` (e.g. the facet axes) where they apply. Styles: the selector's fixed colour;
    its instances, in parameter order, the variants of `figures.selector_style` (lighter shade, dashes,
    marker), the first one solid in the full colour."""
    rows = report.pooled_rows() if rows is None else rows
    found = report.points.instances(rows)
    by_family: Dict[str, List[Tuple[SweepInstance, np.ndarray, Dict[str, str]]]] = {}
    for inst, idx in found:
        by_family.setdefault(inst.selector, []).append((inst, idx, _params(inst)))
    lines: List[SweepLine] = []
    for family, members in by_family.items():
        keys = set().union(*(set(p) for _, _, p in members))
        varying = [k for k in _key_order(list(keys)) if len({p.get(k, "") for _, _, p in members}) > 1]
        shown = varying + [a for a in always if a not in varying]
        members.sort(key=lambda m: tuple(_sort_key(m[2].get(k, "")) for k in varying))
        for k, (inst, idx, p) in enumerate(members):
            text = " ".join(f"{a}={p[a]}" for a in _key_order(shown) if a in p)
            style = selector_style(family, k % len(_VARIANTS))
            if k >= len(_VARIANTS):  # more instances than variants: another marker as well
                style = dict(style, marker=("x", "+", "1", "2", "3", "4")[(k // len(_VARIANTS) - 1) % 6])
            lines.append(SweepLine(inst, idx, p, f"{family} {text}".strip(), style))
    # Unique labels (instances that differ in nothing shown: add the spec).
    seen: Dict[str, int] = {}
    for ln in lines:
        seen[ln.label] = seen.get(ln.label, 0) + 1
    for ln in lines:
        if seen[ln.label] > 1:
            ln.label = f"{ln.label} [{ln.instance.spec}]"
    return lines


def _sort_key(v: str) -> Tuple[int, float, str]:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def _sparsity_axis(ax: Any, values: np.ndarray, label: str, width_in: float = 4.5) -> None:
    """x axis for sparsities: logit scale when they reach 0.8 (else linear); on a logit axis round tick values,
    as many as the axes' width holds (about one per 0.45 in)."""
    v = values[np.isfinite(values)]
    if v.size and float(v.min()) > 0.0 and float(v.max()) < 1.0 and float(v.max()) >= 0.8:
        ax.set_xscale("logit")
        lo, hi = float(v.min()), float(v.max())
        llo, lhi = np.log(lo / (1 - lo)), np.log(hi / (1 - hi))
        pad = max(0.08 * (lhi - llo), 0.25)
        ax.set_xlim(1 / (1 + np.exp(-(llo - pad))), 1 / (1 + np.exp(-(lhi + pad))))
        lo_lim, hi_lim = ax.get_xlim()
        # Round values kept apart in logit units by the axis range over the ticks the width holds.
        min_sep = (np.log(hi_lim / (1 - hi_lim)) - np.log(lo_lim / (1 - lo_lim))) / max(2.5, width_in / 0.45)
        ticks: List[float] = []
        for t in (0.5, 0.75, 0.9, 0.25, 0.95, 0.1, 0.99, 0.98, 0.3, 0.4, 0.6, 0.7, 0.8, 0.2, 0.05, 0.995, 0.999,
                  0.998, 0.02, 0.01):  # the roundest first
            lt = np.log(t / (1 - t))
            if lo_lim <= t <= hi_lim and all(abs(lt - np.log(u / (1 - u))) >= min_sep for u in ticks):
                ticks.append(t)
        ticks.sort()
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda t, _: f"{t:g}"))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"{label} (logit scale)")
    else:
        lo, hi = _finite_range(v, (0.0, 1.0))
        pad = 0.05 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(label)


def _partial_mark(fig: Any, report: SweepReport) -> None:
    if report.is_partial:
        fig.text(0.995, 0.995, f"PARTIAL SWEEP: {report.units_done} of {report.units_total} work units",
                 ha="right", va="top", fontsize=FONT_PT, color="#B00000", gid="partial")


def _partial_caption(report: SweepReport) -> str:
    if not report.is_partial:
        return ""
    return (f" PARTIAL SWEEP: {report.units_done} of {report.units_total} work units (capture x layer) were done; "
            "the points cover the finished units only.")


def _pooled_text(report: SweepReport) -> str:
    n = report.num_captures
    if n == 1:
        return f"on the sweep's capture ({report.capture_name(0)})"
    return f"pooled over the {n} captures (the report's pooled rows, capture = -1)"


def _legend(fig: Any, spec: Any, handles: List[Any], labels: List[str], ncol: int = 1, below: bool = False) -> None:
    lax = fig.add_subplot(spec)
    lax.set_axis_off()
    lax.legend(handles, labels, loc="upper center" if below else "upper left", ncol=ncol, handlelength=2.6,
               borderaxespad=0.0, columnspacing=1.2)


_TEXT_WIDTHS: Dict[str, float] = {}


def _text_width_pt(text: str) -> float:
    """Width of one line of legend text at FONT_PT in the package font (measured, cached)."""
    if text not in _TEXT_WIDTHS:
        try:
            from matplotlib.font_manager import FontProperties
            from matplotlib.textpath import TextToPath
            w, _, _ = TextToPath().get_text_width_height_descent(
                text, FontProperties(family=STYLE["font.family"], size=FONT_PT), ismath=False)
            _TEXT_WIDTHS[text] = float(w)
        except Exception:  # noqa: BLE001 - an estimate is good enough for a layout
            _TEXT_WIDTHS[text] = len(text) * FONT_PT * 0.55
    return _TEXT_WIDTHS[text]


def _label_width_in(labels: Sequence[str]) -> float:
    """Width of a legend column: the widest text line, plus the handle, its gap and the column spacing
    (2.6 + 0.8 + 1.2 em)."""
    widest = max((_text_width_pt(line) for l in labels for line in l.split("\n")), default=40.0)
    return (widest + 4.6 * FONT_PT) / 72.0


def _legend_width_in(labels: Sequence[str]) -> float:
    return min(_label_width_in(labels), 3.0)


def _same_as(drawn: List[Tuple[str, np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> Optional[str]:
    """The label of a line drawn before with exactly these values, or None."""
    for label, x0, y0 in drawn:
        if x0.shape == x.shape and np.array_equal(x0, x, equal_nan=True) and np.array_equal(y0, y, equal_nan=True):
            return label
    return None


def _thin(style: Dict[str, Any]) -> Dict[str, Any]:
    """A line drawn on top of another with the same values: thinner, smaller markers, so both show."""
    return dict(style, linewidth=0.7, markersize=2.6, zorder=3.5)


def _coincident_caption(coincident: Dict[str, str]) -> str:
    if not coincident:
        return ""
    return (" Thinner lines on top: " + "; ".join(f"{a} (the same values as {b})" for a, b in coincident.items())
            + ".")


@dataclass
class LegendPlan:
    """Where a figure's legend goes: a column on the right (flat entries), or below the axes in `ncol`
    columns, entries grouped under their selector's name (a group never split across columns)."""

    below: bool
    width_in: float     # the right column's width (right)
    ncol: int
    height_in: float    # the rows' height (below)
    columns: List[List[int]] = None  # type: ignore[assignment]  # below: group indices per column


MAX_RIGHT_LEGEND_ENTRIES = 12
_ROW_IN = FONT_PT * 1.45 / 72.0


def _group_columns(sizes: Sequence[int], ncol: int) -> List[List[int]]:
    """Consecutive groups (sizes in rows) into at most ncol columns, the tallest column as short as it
    can be (groups keep their order and are never split)."""
    best: Optional[List[List[int]]] = None
    for target in range(max(sizes, default=1), sum(sizes) + 1):
        cols: List[List[int]] = [[]]
        height = 0
        for g, n in enumerate(sizes):
            if height + n > target and cols[-1]:
                cols.append([])
                height = 0
            cols[-1].append(g)
            height += n
        if len(cols) <= ncol:
            best = cols
            break
    return best or [list(range(len(sizes)))]


def legend_plan(groups: Sequence[Tuple[str, Sequence[str]]], plot_height_in: float,
                extra: Sequence[str] = ()) -> LegendPlan:
    """A right column of flat entries when they fit beside the axes (at most MAX_RIGHT_LEGEND_ENTRIES,
    within the height); else grouped entries (a header per selector, then its instances' parameters)
    below the axes in as many columns as the width holds. `groups`: (selector, its instances' labels);
    `extra`: entries after them (frontier, full attention)."""
    flat = [l for _, ls in groups for l in ls] + list(extra)
    rows_h = (sum(len(l.split("\n")) for l in flat) * FONT_PT * 1.45 + 8) / 72.0
    width = _label_width_in(flat)
    if len(flat) <= MAX_RIGHT_LEGEND_ENTRIES and width <= 3.0 and rows_h <= plot_height_in:
        return LegendPlan(False, width, 1, 0.0)
    return _grouped_plan(groups, extra)


def _grouped_plan(groups: Sequence[Tuple[str, Sequence[str]]], extra: Sequence[str]) -> LegendPlan:
    texts = [name for name, _ in groups] + [p[len(name):].strip() for name, ps in groups for p in ps] + list(extra)
    width = min(_label_width_in(texts), DOUBLE_COLUMN_IN - 0.1)
    ncol = max(1, int((DOUBLE_COLUMN_IN - 0.1) // width))
    sizes = [1 + len(ps) for _, ps in groups] + ([sum(len(e.split("\n")) for e in extra)] if extra else [])
    cols = _group_columns(sizes, ncol)
    rows = max(sum(sizes[g] for g in col) for col in cols)
    return LegendPlan(True, 0.0, len(cols), rows * _ROW_IN + 8 / 72.0, cols)


def _grouped_legend(fig: Any, spec: Any, plan: LegendPlan, lines: List["SweepLine"],
                    extra: Sequence[Tuple[Any, str]] = ()) -> Any:
    """The legend below the axes: per selector a bold header, then each instance's parameters; groups
    kept whole in the plan's columns (padded with blank rows, filled column by column)."""
    blank = Line2D([], [], linestyle="none", marker=None)
    groups: List[List[Tuple[Any, str, bool]]] = []
    families: Dict[str, List[SweepLine]] = {}
    for ln in lines:
        families.setdefault(ln.instance.selector, []).append(ln)
    for fam, members in families.items():
        entries = [(blank, fam, True)]
        for ln in members:
            text = ln.label[len(fam):].strip() or "(defaults)"
            entries.append((Line2D([], [], color=ln.style["color"], marker=ln.style["marker"],
                                   linestyle=ln.style["linestyle"]), text, False))
        groups.append(entries)
    if extra:
        groups.append([(h, t, False) for h, t in extra])
    rows = max(sum(len(groups[g]) for g in col) for col in plan.columns)
    handles, labels, bold = [], [], []
    for col in plan.columns:
        entries = [e for g in col for e in groups[g]]
        entries += [(blank, "", False)] * (rows - len(entries))
        for h, t, b in entries:
            handles.append(h)
            labels.append(t)
            bold.append(b)
    lax = fig.add_subplot(spec)
    lax.set_axis_off()
    leg = lax.legend(handles, labels, loc="upper center", ncol=len(plan.columns), handlelength=2.6,
                     borderaxespad=0.0, columnspacing=1.2)
    for text, b in zip(leg.get_texts(), bold):
        if b:
            text.set_fontweight("bold")
    return leg


def _family_groups(lines: List["SweepLine"]) -> List[Tuple[str, List[str]]]:
    """(selector, its instances' labels) in order, for legend_plan."""
    out: Dict[str, List[str]] = {}
    for ln in lines:
        out.setdefault(ln.instance.selector, []).append(ln.label)
    return list(out.items())


# ----------------------------------------------------------------------------
# (a) Mass recall vs sparsity.
# ----------------------------------------------------------------------------

CONTEXT_COLOUR = "#c4c4c4"


def _split_axis(members: List[SweepLine], taken: Sequence[str]) -> Optional[str]:
    """The parameter (not in `taken`) whose values split `members` into the smallest largest group
    (ties: fewer groups, then the parameter order); None when no parameter differs."""
    keys = _key_order(list(set().union(*(set(m.params) for m in members))))
    best, best_score = None, None
    for k in keys:
        if k in taken:
            continue
        values = {m.params.get(k, "") for m in members}
        if len(values) < 2:
            continue
        largest = max(sum(1 for m in members if m.params.get(k, "") == v) for v in values)
        score = (largest, len(values))
        if best_score is None or score < best_score:
            best, best_score = k, score
    return best


def _panels(lines: List[SweepLine]) -> List[Tuple[str, Dict[str, str], List[SweepLine]]]:
    """(title, fixed parameters, lines) per panel: one panel for a few instances; else one per selector,
    split by the parameters that separate its instances best until a panel holds at most
    MAX_LINES_PER_PANEL of them."""
    if len(lines) <= MAX_LINES_PER_PANEL:
        return [("", {}, lines)]
    families: Dict[str, List[SweepLine]] = {}
    for ln in lines:
        families.setdefault(ln.instance.selector, []).append(ln)
    out = []
    for fam, members in families.items():
        groups: List[Tuple[Dict[str, str], List[SweepLine]]] = [({}, members)]
        while any(len(ms) > MAX_LINES_PER_PANEL and _split_axis(ms, list(w)) for w, ms in groups):
            new = []
            for where, ms in groups:
                axis = _split_axis(ms, list(where)) if len(ms) > MAX_LINES_PER_PANEL else None
                if axis is None:
                    new.append((where, ms))
                    continue
                for v in sorted({m.params.get(axis, "") for m in ms}, key=_sort_key):
                    new.append((dict(where, **{axis: v}), [m for m in ms if m.params.get(axis, "") == v]))
            groups = new
        for where, ms in groups:
            out.append((" ".join([fam] + [f"{a}={v}" for a, v in where.items()]), where, ms))
    return out


def _short_label(ln: SweepLine, where: Dict[str, str]) -> str:
    """Legend text inside a selector's panel: the parameters, without the name and the panel's facet."""
    text = ln.label[len(ln.instance.selector):].strip()
    for a, v in where.items():
        text = text.replace(f"{a}={v}", "").strip()
    return " ".join(text.split()) or ln.instance.selector


def realised_gaps(report: SweepReport, lines: List[SweepLine]) -> Dict[str, float]:
    """Per instance: the largest requested - realised sparsity over its points (sparsity budgets)."""
    pts = report.points
    out: Dict[str, float] = {}
    for ln in lines:
        gap = pts["budget"][ln.rows] - pts["sparsity"][ln.rows]
        gap = gap[np.isfinite(gap)]
        if gap.size:
            out[ln.label] = float(gap.max())
    return out


def _realised_gap_note(report: SweepReport, lines: List[SweepLine], threshold: float = 0.02) -> str:
    gaps = {k: v for k, v in realised_gaps(report, lines).items() if v > threshold}
    if not gaps:
        return " The realised sparsity is within 0.02 of the requested one for every point."
    worst = sorted(gaps.items(), key=lambda kv: -kv[1])
    listed = "; ".join(f"{k} by up to {v:.2f}" for k, v in worst[:6]) + ("; ..." if len(worst) > 6 else "")
    return (" Caution: some selectors attend more keys than the requested sparsity leaves (forced window and "
            "sink keys, full layers, at least one block per row), so at the same x they are not equally sparse; "
            f"realised sparsity below the requested one: {listed} (summary.md lists the realised sparsity).")


def fig_sweep_recall_vs_sparsity(report: SweepReport, realised: bool = False) -> Optional[Rendered]:
    """Pooled mass recall vs sparsity per selector instance, mean line and p10..p50 band; small multiples
    (one panel per selector, the others' means in grey) when one panel would hold too many bands.

    x: the realised sparsity for token budgets, the requested one (the budget axis) for sparsity budgets;
    `realised=True` forces the realised sparsity (the companion figure of a sparsity-budget sweep)."""
    pooled = report.pooled_rows()
    if pooled.size == 0:
        return None
    pts = report.points
    use_budget = report.budget_kind == "sparsity" and not realised
    x_col = "budget" if use_budget else "sparsity"
    lines = sweep_lines(report, pooled)
    panels = _panels(lines)
    n = len(panels)
    single = n == 1
    ncols = 1 if single else (n if n <= 3 else (2 if n == 4 else (3 if n <= 12 else 4)))
    nrows = (n + ncols - 1) // ncols
    panel_h = min(2.6 if nrows == 1 else (2.1 if nrows == 2 else 1.85), (MAX_FIGURE_HEIGHT_IN - 0.75) / nrows)
    fig, _ = _new_figure(report, DOUBLE_COLUMN_IN, 0.55 + panel_h * nrows)
    if single:
        legend_w = _legend_width_in([ln.label for ln in lines])
        gs = fig.add_gridspec(1, 2, width_ratios=[DOUBLE_COLUMN_IN - legend_w, legend_w])
    else:
        gs = fig.add_gridspec(nrows, ncols)
    all_x = pts[x_col][pooled]
    coincident: Dict[str, str] = {}
    data: Dict[str, Any] = {"x_column": x_col, "panels": [], "instances": {}, "coincident": coincident}
    axes = []
    for k, (title, where, members) in enumerate(panels):
        ax = fig.add_subplot(gs[k // ncols, k % ncols], sharex=axes[0] if axes else None,
                             sharey=axes[0] if axes else None)
        axes.append(ax)
        if not single:  # the other selectors' means, for reference
            for ln in lines:
                if ln in members:
                    continue
                x, y = pts[x_col][ln.rows], pts["mass_recall"][ln.rows]
                o = np.argsort(x, kind="stable")
                ok = np.isfinite(x[o]) & np.isfinite(y[o])
                ax.plot(x[o][ok], y[o][ok], color=CONTEXT_COLOUR, linewidth=0.6, zorder=0.5, gid=f"context:{k}:{ln.label}")
        handles, labels = [], []
        drawn: List[Tuple[str, np.ndarray, np.ndarray]] = []
        for ln in members:
            idx = ln.rows
            x = pts[x_col][idx]
            order = np.argsort(x, kind="stable")
            idx, x = idx[order], x[order]
            mean, p10, p50 = pts["mass_recall"][idx], pts["mass_recall_p10"][idx], pts["mass_recall_p50"][idx]
            ok = np.isfinite(x) & np.isfinite(mean)
            same = _same_as(drawn, x, mean)
            drawn.append((ln.label, x, mean))
            style = _thin(ln.style) if same else dict(ln.style, zorder=3)
            if same:
                coincident[ln.label] = same
            data["instances"][ln.label] = {"rows": idx, "spec": ln.instance.spec, "schedule": ln.instance.schedule,
                                           "x": x, "mean": mean, "p10": p10, "p50": p50, "panel": k}
            if not ok.any():
                continue
            band = ok & np.isfinite(p10) & np.isfinite(p50)
            ax.fill_between(x[band], p10[band], p50[band], color=ln.style["color"], alpha=0.15, linewidth=0,
                            gid=f"band:{ln.label}")
            ax.plot(x[ok], mean[ok], gid=f"mean:{ln.label}", **style)
            handles.append((Patch(facecolor=ln.style["color"], alpha=0.2, linewidth=0),
                            Line2D([], [], color=ln.style["color"], marker=ln.style["marker"],
                                   linestyle=ln.style["linestyle"])))
            labels.append(ln.label if single else _short_label(ln, where))
        data["panels"].append({"title": title, "where": where, "labels": [ln.label for ln in members]})
        ax.set_title(title or ("Mass recall vs realised sparsity" if realised else "Mass recall vs sparsity"),
                     loc="left")
        if k % ncols:
            ax.tick_params(labelleft=False)
        else:
            ax.set_ylabel("mass recall R (share of mass)" if panel_h >= 2.0 else "mass recall R")
        if k // ncols < nrows - 1 and k + ncols < n:
            ax.tick_params(labelbottom=False)
        if single:
            handles.append(Patch(facecolor="#888888", alpha=0.3, linewidth=0))
            labels.append("p10..p50 band")
            _legend(fig, gs[0, 1], handles, labels)
        elif len(members) > 1 or labels[:1] != [members[0].instance.selector]:
            # Where it covers the least (lines and bands), on a light frame so that what it covers still shows.
            ax.legend(handles, labels, loc="best", handlelength=2.2, borderaxespad=0.3, labelspacing=0.25,
                      frameon=True, framealpha=0.8, edgecolor="none", borderpad=0.3)
    axes[0].set_ylim(0, 1.02)
    xlabel = "requested sparsity s" if use_budget else "realised sparsity 1 - attended / causal keys"
    legend_in = _legend_width_in([ln.label for ln in lines]) if single else 0.0
    _sparsity_axis(axes[0], all_x, xlabel, (DOUBLE_COLUMN_IN - legend_in - 0.5 * ncols) / ncols)
    xlabel = axes[0].get_xlabel()
    if ncols > 1:  # a panel is too narrow for the label on one line
        xlabel = xlabel.replace(" 1 - ", "\n1 - ").replace(" (logit", "\n(logit")
    for k, ax in enumerate(axes):  # under the lowest panel of each column
        ax.set_xlabel(xlabel if k + ncols >= n else "")
    data["xlabel"] = xlabel
    _partial_mark(fig, report)
    xdesc = ("the requested sparsity s (the budget axis: the share of each causal row dropped)" if use_budget else
             "the realised sparsity, 1 - mean over scored rows of attended keys / causal keys (forced window and "
             "sink keys and a hybrid selector's full layers count as attended), one point per "
             + ("token budget" if report.budget_kind == "tokens" else "requested sparsity"))
    caption = (f"Model mean mass recall (over every layer, head and query row) of each selector instance, "
               f"{_pooled_text(report)}, against {xdesc}. Lines: the mean; shaded {SWEEP_BAND_NOTE}, pooled like "
               "the mean. Instances of one selector share its colour and differ in shade, dashes and marker; "
               "legends name the parameters that differ between them.")
    if use_budget:
        caption += _realised_gap_note(report, lines)
    if not single:
        caption += (" One panel per selector" + (" (split by a parameter where it has more instances than line "
                                                  "styles)" if any(w for _, w, _ in panels) else "")
                    + "; thin grey lines: the other selectors' means, for reference.")
    caption += _coincident_caption(coincident)
    caption += _partial_caption(report)
    if realised:
        return Rendered("sweep_recall_vs_realised_sparsity", "Mass recall vs realised sparsity (sweep)",
                        caption + " The companion of sweep_recall_vs_sparsity, whose x is the requested sparsity.",
                        fig, data)
    return Rendered("sweep_recall_vs_sparsity", "Mass recall vs sparsity (sweep)", caption, fig, data)


def fig_sweep_recall_vs_realised_sparsity(report: SweepReport) -> Optional[Rendered]:
    """For sparsity budgets: the recall figure against the realised sparsity (token budgets: the main one is)."""
    if report.budget_kind != "sparsity":
        return None
    return fig_sweep_recall_vs_sparsity(report, realised=True)


# ----------------------------------------------------------------------------
# (b) The Pareto view.
# ----------------------------------------------------------------------------

def sweep_frontier(report: SweepReport, rows: np.ndarray) -> List[int]:
    """Row indices of the Pareto frontier of (kv_bytes, mass_recall) over `rows`, sorted by bytes."""
    pts = report.points
    points = [(int(i), 0, float(pts["kv_bytes"][i]), float(pts["mass_recall"][i])) for i in rows]
    return [p[0] for p in pareto_frontier(points)]


def _label_frontier(fig: Any, ax: Any, report: SweepReport, frontier: List[int], data: Dict[str, Any]) -> None:
    """Budget labels next to the frontier points where they fit (`figures.place_point_labels`)."""
    pts = report.points
    rows = report.pooled_rows()
    items = [(budget_text(report, float(pts["budget"][i])), float(pts["kv_bytes"][i]), float(pts["mass_recall"][i]),
              f"frontier-label:{i}") for i in frontier]
    avoid = np.column_stack([pts["kv_bytes"][rows], pts["mass_recall"][rows]])
    for i, choice in zip(frontier, place_point_labels(fig, ax, items, avoid)):
        data["frontier_label_offsets"][int(i)] = choice


def fig_sweep_pareto(report: SweepReport) -> Optional[Rendered]:
    """Pooled mass recall vs resident KV bytes (log2) of every point; the frontier over all points marked."""
    pooled = report.pooled_rows()
    pts = report.points
    if pooled.size == 0:
        return None
    xs, ys = pts["kv_bytes"][pooled], pts["mass_recall"][pooled]
    ok = np.isfinite(xs) & np.isfinite(ys) & (xs > 0)
    if not ok.any():
        return None
    lines = sweep_lines(report, pooled)
    plot_h = 3.0
    extra_texts = ["Pareto frontier (budget\nnext to it where room)", "full attention (000 KiB)"]
    plan = legend_plan(_family_groups(lines), plot_h, extra_texts)
    fig, _ = _new_figure(report, DOUBLE_COLUMN_IN, plot_h + 0.3 + plan.height_in)
    if plan.below:
        gs = fig.add_gridspec(2, 1, height_ratios=[plot_h, plan.height_in])
    else:
        gs = fig.add_gridspec(1, 2, width_ratios=[DOUBLE_COLUMN_IN - plan.width_in, plan.width_in])
    ax = fig.add_subplot(gs[0, 0])
    data: Dict[str, Any] = {"instances": {}, "frontier_rows": [], "legend_below": plan.below}
    handles, labels = [], []
    drawn: List[Tuple[str, np.ndarray, np.ndarray]] = []
    coincident: Dict[str, str] = {}
    data["coincident"] = coincident
    for ln in lines:
        idx = ln.rows[np.argsort(pts["kv_bytes"][ln.rows], kind="stable")]
        x, y = pts["kv_bytes"][idx], pts["mass_recall"][idx]
        good = np.isfinite(x) & np.isfinite(y) & (x > 0)
        same = _same_as(drawn, x, y)
        drawn.append((ln.label, x, y))
        if same:
            coincident[ln.label] = same
        ax.plot(x[good], y[good], gid=f"kv:{ln.label}", **(_thin(ln.style) if same else dict(ln.style, linewidth=1.0)))
        data["instances"][ln.label] = {"rows": idx, "kv_bytes": x, "mass_recall": y, "spec": ln.instance.spec}
        handles.append(Line2D([], [], color=ln.style["color"], marker=ln.style["marker"],
                              linestyle=ln.style["linestyle"]))
        labels.append(ln.label)
    frontier = sweep_frontier(report, pooled)
    data["frontier_rows"] = frontier
    label_of = {int(i): ln.label for ln in lines for i in ln.rows}
    if frontier:
        fx, fy = pts["kv_bytes"][frontier], pts["mass_recall"][frontier]
        ax.step(fx, fy, where="post", color="#555555", linewidth=0.9, alpha=0.8, zorder=1, gid="frontier")
        ax.plot(fx, fy, linestyle="none", marker="o", markersize=9, markerfacecolor="none", markeredgecolor="#555555",
                markeredgewidth=0.9, zorder=4, gid="frontier-points")
        data["frontier_label_offsets"] = {}
        handles.append(Line2D([], [], color="#555555", linewidth=0.9, marker="o", markersize=9, markerfacecolor="none"))
        labels.append("Pareto frontier (budget\nnext to it where room)")
        data["frontier"] = [(label_of.get(int(i), "?"), float(pts["budget"][i]), float(pts["kv_bytes"][i]),
                             float(pts["mass_recall"][i])) for i in frontier]
    full = pts["kv_full_bytes"][pooled]
    full = full[np.isfinite(full) & (full > 0)]
    all_x = list(xs[ok])
    if full.size:
        f0 = float(np.median(full))
        data["kv_full_bytes"] = f0
        all_x.append(f0)
        ax.axvline(f0, color=FULL_KV_COLOUR, linestyle=":", linewidth=1.0, zorder=0, gid="full-kv")
        handles.append(Line2D([], [], color=FULL_KV_COLOUR, linestyle=":", linewidth=1.0))
        labels.append(f"full attention ({bytes_label(f0)})")
    ax.set_xscale("log", base=2)
    lo, hi = _log2_bytes_axis(ax.xaxis, float(min(all_x)), float(max(all_x)), max_ticks=7)
    ax.set_xlim(lo, hi)
    ylo, yhi = _finite_range(ys[ok])
    ax.set_ylim(max(0.0, ylo - 0.05), min(1.02, yhi + 0.04) if yhi <= 1.0 else yhi + 0.04)
    if frontier:
        _label_frontier(fig, ax, report, frontier, data)
    C = report.num_captures
    ax.set_xlabel("resident KV cache, whole model (bytes, log2 scale)" + (", mean over captures" if C > 1 else ""))
    ax.set_ylabel("mass recall R (model mean)")
    ax.set_title("Recall vs KV memory", loc="left")
    if plan.below:
        n = len(lines)
        _grouped_legend(fig, gs[1, 0], plan, lines, list(zip(handles[n:], labels[n:])))
    else:
        _legend(fig, gs[0, 1], handles, labels)
    _partial_mark(fig, report)
    ctx = sorted({n for n in (report.capture_seq_len(c) for c in range(report.num_captures)) if n})
    ctx_text = ("at the capture's context" if not ctx else f"at the capture's context ({ctx[0]} tokens)"
                if len(ctx) == 1 else
                f"at each capture's context ({', '.join(str(c) for c in ctx)} tokens), averaged over the captures")
    caption = (f"Model mean mass recall of every selector instance at every budget, {_pooled_text(report)}, against "
               f"the resident KV cache it needs (kv_bytes: K and V in bf16 plus the selector's resident metadata, "
               f"whole model, batch 1, {ctx_text}; priced by hysparse from its footprint table). One line per "
               "instance through its budgets; selectors that keep the whole cache stack at one x. Circled and "
               "joined by the grey staircase: the Pareto frontier over all points (no other point has at least "
               "the recall for no more bytes), labelled with the budget where there is room (summary.md lists "
               "every frontier point). Dotted: full attention (kv_full_bytes).")
    caption += _coincident_caption(coincident)
    caption += _partial_caption(report)
    return Rendered("sweep_pareto", "Recall vs KV memory, Pareto frontier (sweep)", caption, fig, data)


# ----------------------------------------------------------------------------
# (c) Per capture.
# ----------------------------------------------------------------------------

def _default_budgets(report: SweepReport) -> List[float]:
    b = sorted(float(v) for v in report.budget_values)
    if len(b) <= 3:
        return b
    return [b[0], b[len(b) // 2], b[-1]]


def _tick_name(name: str, width: int = 12) -> str:
    stem = name[:-3] if name.endswith(".h5") else name
    return stem if len(stem) <= width else stem[:width - 1] + "\u2026"


def fig_sweep_per_capture(report: SweepReport, budgets: Optional[Sequence[float]] = None) -> Optional[Rendered]:
    """Mass recall of every instance per capture (and pooled) at up to three budgets; several captures only."""
    C = report.num_captures
    if C < 2:
        return None
    pts = report.points
    budgets = list(budgets) if budgets else _default_budgets(report)
    lines = sweep_lines(report, np.arange(len(pts)))
    plot_h = 2.75
    plan = legend_plan(_family_groups(lines), plot_h)
    fig, _ = _new_figure(report, DOUBLE_COLUMN_IN, plot_h + 0.25 + plan.height_in)
    nb = len(budgets)
    if plan.below:
        gs = fig.add_gridspec(2, nb, height_ratios=[plot_h, plan.height_in])
    else:
        gs = fig.add_gridspec(1, nb + 1, width_ratios=[1.0] * nb + [plan.width_in / (DOUBLE_COLUMN_IN - plan.width_in) * nb])
    positions = list(range(C)) + [C + 0.6]
    names = [report.capture_name(c) for c in range(C)] + ["pooled"]
    ticks = [_tick_name(t) for t in names]
    data: Dict[str, Any] = {"budgets": budgets, "captures": names, "instances": {}}
    axes = []
    spread = 0.32
    for j, b in enumerate(budgets):
        ax = fig.add_subplot(gs[0, j], sharey=axes[0] if axes else None)
        axes.append(ax)
        ax.axvspan(C + 0.1, C + 1.1, color="#eeeeee", zorder=0, linewidth=0)
        for k, ln in enumerate(lines):
            y = np.full(C + 1, np.nan)
            rows = np.full(C + 1, -1, dtype=np.int64)
            sel = (pts["budget"][ln.rows] == b)
            for i in ln.rows[sel]:
                c = int(pts["capture"][i])
                c = C if c < 0 else c
                y[c], rows[c] = pts["mass_recall"][i], i
            off = (k - (len(lines) - 1) / 2) / max(len(lines), 1) * spread
            x = np.array(positions) + off
            ax.plot(x[:C], y[:C], gid=f"cap:{j}:{ln.label}", **dict(ln.style, linewidth=0.7, markersize=3.5))
            ax.plot(x[C:], y[C:], gid=f"pooled:{j}:{ln.label}",
                    **dict(ln.style, linestyle="none", markersize=3.5))
            data["instances"].setdefault(ln.label, {})[b] = {"mass_recall": y, "rows": rows}
        ax.set_xticks(positions)
        if max(len(t) for t in ticks) > 6:
            ax.set_xticklabels(ticks, rotation=35, ha="right", rotation_mode="anchor")
        else:
            ax.set_xticklabels(ticks)
        ax.set_xlim(-0.5, C + 1.1)
        ax.set_xlabel("capture")
        ax.grid(axis="x", visible=False)
        ax.set_title(report.describe_budget(b), loc="left")
        if j == 0:
            ax.set_ylabel("mass recall R (model mean)")
        else:
            ax.tick_params(labelleft=False)
    allv = pts["mass_recall"][np.isin(pts["budget"], budgets)]
    lo, hi = _finite_range(allv)
    axes[0].set_ylim(max(0.0, lo - 0.05), min(1.02, hi + 0.04))
    handles = [Line2D([], [], color=ln.style["color"], marker=ln.style["marker"], linestyle=ln.style["linestyle"])
               for ln in lines]
    if plan.below:
        _grouped_legend(fig, gs[1, :], plan, lines)
    else:
        _legend(fig, gs[0, nb], handles, [ln.label for ln in lines])
    data["legend_below"] = plan.below
    _partial_mark(fig, report)
    caption = (f"Model mean mass recall of each selector instance on each of the {C} captures and pooled (grey "
               f"column) at {'budgets' if nb > 1 else 'budget'} "
               f"{', '.join(budget_text(report, b) for b in budgets)}; markers of one capture are spread sideways "
               "by instance. Captures: " + "; ".join(
                   f"{report.capture_name(c)} ({report.capture_seq_len(c) or '?'} tokens)" for c in range(C)) + ".")
    caption += _partial_caption(report)
    return Rendered("sweep_per_capture", "Mass recall per capture (sweep)", caption, fig, data)


# ----------------------------------------------------------------------------
# Registry and rendering.
# ----------------------------------------------------------------------------

SWEEP_FIGURES = {
    "sweep_recall_vs_sparsity": fig_sweep_recall_vs_sparsity,
    "sweep_recall_vs_realised_sparsity": fig_sweep_recall_vs_realised_sparsity,
    "sweep_pareto": fig_sweep_pareto,
    "sweep_per_capture": fig_sweep_per_capture,
}

SWEEP_SKIP_REASONS = {
    "sweep_recall_vs_sparsity": "the sweep has no pooled points",
    "sweep_recall_vs_realised_sparsity": "token budgets: sweep_recall_vs_sparsity is already against the realised "
                                         "sparsity",
    "sweep_pareto": "the sweep has no pooled points with KV bytes and recall",
    "sweep_per_capture": "the sweep has a single capture",
}


def build_sweep(report: SweepReport, name: str, budgets: Optional[Sequence[float]] = None) -> Optional[Rendered]:
    builder = SWEEP_FIGURES[name]
    with matplotlib.rc_context(STYLE):
        if name == "sweep_per_capture":
            return builder(report, budgets=budgets)
        return builder(report)


def render_sweep(report: SweepReport, out_dir: str, budgets: Optional[Sequence[float]] = None,
                 formats: Sequence[str] = ("png", "pdf"), keep_figures: bool = False
                 ) -> Tuple[List[Rendered], List[Tuple[str, str]]]:
    """Build and save every sweep figure. Returns (rendered, skipped as (name, reason))."""
    import os
    os.makedirs(out_dir, exist_ok=True)
    rendered, skipped = [], []
    for name in SWEEP_FIGURES:
        r = build_sweep(report, name, budgets)
        if r is None:
            skipped.append((name, SWEEP_SKIP_REASONS[name]))
            continue
        save(r, report, out_dir, formats)  # type: ignore[arg-type]  # provenance fields as a Report's
        if not keep_figures:
            r.figure = None  # type: ignore[assignment]
        rendered.append(r)
    return rendered, skipped
