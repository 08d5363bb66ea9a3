"""Markdown summary of a hysparse report: provenance, the key table per budget, the figure index."""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .kvbytes import RULE_TEXT, selector_kv
from .report import Report

__all__ = ["ranked_table", "summary_markdown", "sweep_markdown", "sweep_best_table", "write_text_atomic"]

# Columns of the key table: (header, dataset, digits).
KEY_COLUMNS: Tuple[Tuple[str, str, int], ...] = (
    ("mean R", "model_mass_recall_mean", 4),
    ("mean R, sparse layers", "model_mass_recall_mean_sparse_layers", 4),
    ("p10", "model_mass_recall_p10", 3),
    ("min", "model_mass_recall_min", 3),
    ("vs oracle", "model_recall_vs_oracle_mean", 4),
    ("attended keys", "model_attended_keys_mean", 1),
    ("output error", "model_output_rel_error_mean", 4),
)


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _bytes(value: float) -> str:
    """Bytes in binary units: 1536 -> "1.50 KiB"."""
    for div, unit in ((1024.0 ** 4, "TiB"), (1024.0 ** 3, "GiB"), (1024.0 ** 2, "MiB"), (1024.0, "KiB")):
        if abs(value) >= div:
            return f"{value / div:.2f} {unit}"
    return f"{value:.0f} B"


def _md(text: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _text(text: Any) -> str:
    """A value for running Markdown text (one line)."""
    return " ".join(str(text).split())


def ranked_table(report: Report, budget_index: int) -> List[Dict[str, Any]]:
    """Selectors at one budget, ranked by model mean mass recall (higher first, ties in report order, NaN last).

    Each row: label, spec, and the KEY_COLUMNS values (None where the report lacks the dataset),
    plus saturated_pct: saturated rows over all evaluated rows of all layers and heads, in percent.
    """
    rows = []
    total_rows = report.num_rows * report.num_heads * report.num_layers
    for order, (label, s) in enumerate(report.selectors.items()):
        row: Dict[str, Any] = {"label": label, "spec": s.spec, "order": order}
        for _, name, _ in KEY_COLUMNS:
            a = s.get(name)
            row[name] = None if a is None else float(a.values[budget_index])
        sat = float(np.sum(s.saturated_rows[budget_index]))
        row["saturated_pct"] = 100.0 * sat / total_rows if total_rows else None
        rows.append(row)

    def key(r: Dict[str, Any]) -> Tuple[int, float, int]:
        v = r["model_mass_recall_mean"]
        finite = v is not None and np.isfinite(v)
        return (0 if finite else 1, -v if finite else 0.0, r["order"])

    rows.sort(key=key)
    return rows


def _provenance(report: Report, w: Any) -> None:
    """The provenance section (root attributes of the report)."""
    p = report.provenance
    w("## Provenance")
    w("")
    w("| | |")
    w("|---|---|")
    files = report.input_files
    shas = p.get("input_sha256") or []
    if isinstance(shas, str):
        shas = [shas]
    inputs = "; ".join(f"`{_md(f)}`" + (f" (sha256 `{_md(shas[i])}`)" if i < len(shas) else "")
                       for i, f in enumerate(files)) or "-"
    for key, value in (
        ("report", f"`{_md(report.path)}` (format {p.get('format')} v{report.format_version})"),
        ("tool", f"{_md(p.get('tool', 'hysparse'))} {_md(p.get('tool_version', '?'))}"),
        ("git sha", f"`{_md(p.get('git_sha', '?'))}`"),
        ("created (UTC)", _md(p.get("created_utc", "?"))),
        ("command line", f"`{_md(p.get('command_line', '?'))}`"),
        ("input", inputs),
        ("backend, device", f"{_md(p.get('backend', '?'))}, {_md(p.get('device', '?'))}"),
        ("threads, seed", f"{_md(p.get('threads', '?'))}, {_md(p.get('seed', '?'))}"),
        ("replay time", None if report.is_kv_report or getattr(report, "is_sweep", False) else
         f"{p['replay_seconds']:.2f} s" if isinstance(p.get("replay_seconds"), float) else "-"),
        ("sweep time", None if not getattr(report, "is_sweep", False) else
         f"{float(np.nansum(report.units['seconds'].values)):.2f} s over {report.units['seconds'].values.size} work "
         "units" if "seconds" in report.units else "-"),
        ("analysed with", f"Python {platform.python_version()}, numpy {np.__version__}, "
                          f"matplotlib {_mpl_version()}"),
    ):
        if value is not None:
            w(f"| {key} | {value} |")
    w("")


def summary_markdown(report: Report, figures: Sequence[Any], skipped: Sequence[Tuple[str, str]],
                     formats: Sequence[str] = ("png", "pdf"), figures_dir: str = ".") -> str:
    """The whole summary.md text. `figures` are Rendered objects (name, title, caption)."""
    if getattr(report, "is_sweep", False):
        return sweep_markdown(report, figures, skipped, formats, figures_dir)
    if report.is_kv_report:
        return _kv_report_markdown(report, figures, skipped, formats, figures_dir)
    cap = report.capture
    cfg = report.config
    out: List[str] = []
    w = out.append
    w(f"# hysparse report: {os.path.basename(report.path)}")
    w("")
    w(f"_{_md(report.provenance_line())}_")
    w("")
    _provenance(report, w)
    w("")
    w("## Capture and configuration")
    w("")
    w(f"- model `{_md(cap.get('model', '?'))}`: {report.num_layers} layers x {cap.get('num_q_heads', report.num_heads)} "
      f"query heads ({cap.get('num_kv_heads', '?')} KV heads), head_dim {cap.get('head_dim', '?')}, "
      f"seq_len {cap.get('seq_len', '?')}")
    if cap.get("source"):
        w(f"- source: `{_md(cap['source'])}`")
    b = report.budgets
    w(f"- budgets ({b.kind}): {', '.join(b.labels)}; queries `{_md(cfg.get('queries', '?'))}` "
      f"({report.num_rows} rows per head)")
    w(f"- block {cfg.get('block', '?')}, sinks {cfg.get('sinks', '?')}, window {cfg.get('window', '?')}, "
      f"schedule `{_md(cfg.get('schedule') or '-')}`, reuse budget {cfg.get('reuse_budget', '?')}")
    w("")
    w("| selector | spec | selection | full layers | description |")
    w("|---|---|---|---|---|")
    for label, s in report.selectors.items():
        full = ", ".join(str(int(l)) for l in s.full_layers) or "-"
        w(f"| {_md(label)} | `{_md(s.spec)}` | {_md(s.selection)} | {full} | {_md(s.description)} |")
    w("")
    w("## Results per budget")
    w("")
    w("Selectors ranked by model mean mass recall R (pooled over every layer, head and query row; a full layer "
      "of a hybrid selector counts with R = 1). _sparse layers_: the mean over the selector's sparse layers only. "
      "p10 and min: over all rows (p10 from a histogram, within 5e-6). _vs oracle_: R / R of the per-head oracle "
      "with the same forced keys. _attended keys_: mean |A|, forced keys included. _output error_: mean "
      "||o_A - o|| / ||o||" + ("" if report.has_output_error else " (not in this report)") +
      ". _saturated_: rows whose budget covers the whole causal row, share of all rows.")
    w("")
    for bi in range(len(b)):
        w(f"### {b.describe(bi)}")
        w("")
        w("| rank | selector | " + " | ".join(h for h, _, _ in KEY_COLUMNS) + " | saturated |")
        w("|---:|---|" + "---:|" * (len(KEY_COLUMNS) + 1))
        for rank, row in enumerate(ranked_table(report, bi), 1):
            cells = [_fmt(row[name], digits) for _, name, digits in KEY_COLUMNS]
            sat = row["saturated_pct"]
            w(f"| {rank} | {_md(row['label'])} | " + " | ".join(cells) + f" | {_fmt(sat, 1)}% |")
        w("")
    if report.reuse is not None:
        r = report.reuse
        m = r.masked()
        L = m.shape[0]
        w("## Cross-layer reuse")
        w("")
        diag = np.diag(r.mass_recall)
        w(f"Mean mass recall of layer l under the blocks layer f selects (HySparse's rule), {r.budget_tokens} tokens, "
          f"block {r.block_size}, no forced keys. Diagonal (own selection) mean {np.nanmean(diag):.3f}; "
          + ", ".join(f"distance {d}: {np.nanmean(np.diag(r.mass_recall, d)):.3f}" for d in range(1, min(L, 4)))
          + ".")
        w("")
        if L <= 16:
            w("| f \\ l | " + " | ".join(str(l) for l in range(L)) + " |")
            w("|---:|" + "---:|" * L)
            for f in range(L):
                cells = ["" if m.mask[f, l] else f"{m[f, l]:.3f}" for l in range(L)]
                w(f"| {f} | " + " | ".join(cells) + " |")
            w("")
    if report.kv is not None:
        kv = report.kv
        w("## KV accounting")
        w("")
        w(f"From the report's /kv group, the replayed model shape ({len(kv.methods)} methods x {kv.contexts.size} "
          f"contexts; datasets {', '.join(sorted(kv.arrays))}); figure `kv_memory`.")
        w("")
        _kv_table(kv, w)
    _selector_kv_section(report, w)
    _figure_index(figures, skipped, formats, figures_dir, w)
    return "\n".join(out)


def _kv_table(kv: Any, w: Any) -> None:
    """Method x context table of the main KV datasets (bytes in binary units)."""
    shown = [(name, head) for name, head in (("resident_bytes", "resident"), ("ratio_to_full", "full / resident"),
                                              ("read_bytes_per_decoded_token", "read per decoded token"))
             if name in kv.arrays and kv.arrays[name].values.ndim == 2]
    if not shown:
        return
    w("| method | context (tokens) | " + " | ".join(head for _, head in shown) + " |")
    w("|---|---:|" + "---:|" * len(shown))
    for i, method in enumerate(kv.methods):
        for j, context in enumerate(kv.contexts):
            cells = []
            for name, _ in shown:
                a = kv.arrays[name]
                v = float(a.values[i, j])
                cells.append(_bytes(v) if a.units == "bytes" else _fmt(v, 2))
            w(f"| {_md(method)} | {int(context)} | " + " | ".join(cells) + " |")
    w("")


def _selector_kv_section(report: Report, w: Any) -> None:
    """Per selector and budget: KV bytes kept per sequence at T and model mean recall (figure recall_vs_kv)."""
    acc = selector_kv(report)
    if acc is None:
        return
    b = report.budgets
    w("## KV bytes per selector")
    w("")
    w(f"K/V plus resident metadata that each selector keeps for one sequence at T = {acc.seq_len} tokens, and its "
      f"model mean mass recall R; full attention keeps {_bytes(acc.full_kv_bytes)} ({_md(acc.full_source)}). "
      "Counted as in figure `recall_vs_kv`; _source_ is the report dataset used: `kv_resident_bytes` (priced by "
      "hysparse from its footprint table)" + (
          "" if acc.source == "report" else
          f", or, FALLBACK for a report without it, the analysis package's re-derivation ({acc.dtype}, "
          f"{acc.bytes_per_token_per_layer:g} B per token per layer; _formula_: from the selector's attributes)")
      + ".")
    w("")
    w("| selector | counted | source | metadata B/token/KV head | " + " | ".join(_md(b.describe(i)) for i in range(len(b)))
      + " |")
    w("|---|---|---|---:|" + "---:|" * len(b))
    for label, s in report.selectors.items():
        sk = acc.selectors.get(label)
        if sk is None:
            w(f"| {_md(label)} | not priced: {_md(acc.skipped.get(label, '?'))} | - | - |" + " - |" * len(b))
            continue
        recall = s.metric("mass_recall", "model")
        cells = [f"{_bytes(float(sk.total_bytes[i]))} (R {_fmt(float(recall[i]), 3)})" for i in range(len(b))]
        counted = sk.residency if sk.from_report else RULE_TEXT[sk.rule]
        origin = f"`{sk.origin}`" if sk.from_report else f"fallback: {sk.origin}"
        w(f"| {_md(label)} | {_md(counted)} | {_md(origin)} | {sk.metadata_per_token:g} | "
          + " | ".join(cells) + " |")
    w("")


def _figure_index(figures: Sequence[Any], skipped: Sequence[Tuple[str, str]], formats: Sequence[str],
                  figures_dir: str, w: Any) -> None:
    w("## Figures")
    w("")
    for fig in figures:
        links = ", ".join(f"[{fmt.upper()}]({_link(figures_dir, fig.name, fmt)})" for fmt in formats)
        w(f"- **{_text(fig.title)}** (`{fig.name}`; {links}): {_text(fig.caption)}")
    for name, reason in skipped:
        w(f"- `{name}`: not drawn: {_text(reason)}")
    w("")


def _kv_report_markdown(report: Report, figures: Sequence[Any], skipped: Sequence[Tuple[str, str]],
                        formats: Sequence[str], figures_dir: str) -> str:
    """summary.md of a KV-accounting report ('hysparse kv -o'): provenance, model, methods, the KV table."""
    kv = report.kv
    a = kv.attrs
    out: List[str] = []
    w = out.append
    w(f"# hysparse KV report: {os.path.basename(report.path)}")
    w("")
    w(f"_{_md(report.provenance_line())}_")
    w("")
    _provenance(report, w)
    w("## Model")
    w("")
    w(f"- {_md(a.get('model_description') or a.get('model', '?'))}")
    if a.get("model_source"):
        w(f"- source: {_text(a['model_source'])}")
    w(f"- KV dtype {_md(a.get('kv_dtype', '?'))}, batch {kv.batch}: {_md(a.get('bytes_per_token_per_layer', '?'))} B "
      f"per token per layer, {_md(a.get('bytes_per_token_full_attention', '?'))} B per token with every layer full")
    schedules = a.get("schedules")
    for sched in ([schedules] if isinstance(schedules, str) else schedules or []):
        w(f"- schedule {_text(sched)}")
    w(f"- contexts (tokens): {', '.join(str(int(c)) for c in kv.contexts)}")
    w("")
    w("## Methods")
    w("")
    w("| method | resolved | source |")
    w("|---|---|---|")
    for i, m in enumerate(kv.methods):
        w(f"| {_md(m)} | `{_md(kv.method_attr('resolved', i) or m)}` | {_md(kv.method_attr('source', i) or '-')} |")
    w("")
    w("## KV accounting")
    w("")
    w(f"Resident bytes are for the whole batch, reads per sequence and decoded token ({len(kv.methods)} methods x "
      f"{kv.contexts.size} contexts; datasets {', '.join(sorted(kv.arrays))}). Binary units.")
    w("")
    _kv_table(kv, w)
    _figure_index(figures, skipped, formats, figures_dir, w)
    return "\n".join(out)


def _link(figures_dir: str, name: str, fmt: str) -> str:
    rel = f"{name}.{fmt}"
    return rel if figures_dir in ("", ".") else f"{figures_dir.rstrip('/')}/{rel}"


def _mpl_version() -> str:
    try:
        import matplotlib
        return matplotlib.__version__
    except ImportError:  # pragma: no cover
        return "-"


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file via a temporary name in the same directory and os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------
# Sweep reports.
# ----------------------------------------------------------------------------

def sweep_best_table(report: Any, rows: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
    """Per budget and selector: the instance with the highest mass recall among `rows` (default: pooled).

    Rows sorted by budget (report order of the budget axis), then by recall, highest first (NaN last).
    Each row: budget, selector, label (legend text), spec, schedule, row (index into /sweep/points),
    and the point's mass_recall, mass_recall_p10, mass_recall_p50, recall_vs_oracle, sparsity,
    kv_bytes, kv_ratio, instances (how many instances of the selector had a finite recall there)."""
    from .sweep_figures import sweep_lines
    pts = report.points
    rows = report.pooled_rows() if rows is None else rows
    lines = sweep_lines(report, rows)
    out: List[Dict[str, Any]] = []
    for b in report.budget_values:
        best: Dict[str, Tuple[Any, int, int]] = {}
        for ln in lines:
            sel = ln.rows[pts["budget"][ln.rows] == b]
            for i in sel:
                v = float(pts["mass_recall"][i])
                fam = ln.instance.selector
                if fam not in best:
                    best[fam] = (ln, int(i), 0)
                cur_ln, cur_i, count = best[fam]
                count += int(np.isfinite(v))
                if np.isfinite(v) and not (np.isfinite(pts["mass_recall"][cur_i]) and
                                           pts["mass_recall"][cur_i] >= v):
                    cur_ln, cur_i = ln, int(i)
                best[fam] = (cur_ln, cur_i, count)
        group = []
        for fam, (ln, i, count) in best.items():
            row = {"budget": float(b), "selector": fam, "label": ln.label, "spec": ln.instance.spec,
                   "schedule": ln.instance.schedule, "row": i, "instances": count}
            for col in ("mass_recall", "mass_recall_p10", "mass_recall_p50", "recall_vs_oracle", "sparsity",
                        "kv_bytes", "kv_ratio"):
                row[col] = float(pts[col][i])
            group.append(row)
        group.sort(key=lambda r: (0, -r["mass_recall"]) if np.isfinite(r["mass_recall"]) else (1, 0.0))
        out += group
    return out


def sweep_markdown(report: Any, figures: Sequence[Any], skipped: Sequence[Tuple[str, str]],
                   formats: Sequence[str] = ("png", "pdf"), figures_dir: str = ".") -> str:
    """summary.md of a sweep report: provenance, the sweep, the best recall per selector at each budget,
    the Pareto frontier, per-capture best recall, the figure index."""
    from .sweep_figures import budget_text, sweep_frontier, sweep_lines
    pts = report.points
    out: List[str] = []
    w = out.append
    w(f"# hysparse sweep: {os.path.basename(report.path)}")
    w("")
    w(f"_{_md(report.provenance_line())}_")
    w("")
    if report.is_partial:
        w(f"> **Warning: partial sweep.** {report.units_done} of {report.units_total} work units (capture x layer) "
          "were done (`/sweep` status `partial`). The numbers below cover the finished units only (a capture "
          "not started has no rows; layers not yet replayed are NaN in its replay datasets and missing from its "
          "means) and will change when the sweep completes (`hysparse sweep --resume`).")
        w("")
    _provenance(report, w)
    C = report.num_captures
    kind = report.budget_kind
    w("## Sweep")
    w("")
    w(f"- status **{_md(report.status)}**: {report.units_done} of {report.units_total} work units")
    w(f"- budgets ({kind}): {', '.join(budget_text(report, float(b)) for b in report.budget_values)}")
    w(f"- {len(pts)} points: {C} capture{'s' if C != 1 else ''}"
      + (" and pooled (mean over captures)" if (pts['capture'] == -1).any() else "")
      + f" x {len(pts.instances(report.pooled_rows()))} selector instances x budgets")
    w("")
    w("| capture | file | sha256 | model | layers | q / kv heads | head_dim | seq_len |")
    w("|---:|---|---|---|---:|---|---:|---:|")
    for c, cap in enumerate(report.captures):
        if cap is None:
            w(f"| {c} | `{_md(report.capture_labels[c])}` | - | not started (partial sweep) | - | - | - | - |")
            continue
        a = cap.capture
        sha = (cap.provenance.get("input_sha256") or ["-"])[0]
        w(f"| {c} | `{_md(report.capture_labels[c] if c < len(report.capture_labels) else a.get('path', '?'))}` | "
          f"`{_md(str(sha)[:16])}` | {_md(a.get('model', '?'))} | {cap.num_layers} | "
          f"{_md(a.get('num_q_heads', '?'))} / {_md(a.get('num_kv_heads', '?'))} | {_md(a.get('head_dim', '?'))} | "
          f"{_md(a.get('seq_len', '?'))} |")
    w("")
    lines = sweep_lines(report)
    w("| instance | selector | spec | schedule |")
    w("|---|---|---|---|")
    for ln in lines:
        w(f"| {_md(ln.label)} | {_md(ln.instance.selector)} | `{_md(ln.instance.spec)}` | "
          f"{_md(ln.instance.schedule or '-')} |")
    w("")
    pooled_word = "pooled over the captures" if C > 1 else "on the sweep's capture"
    w(f"## Best recall per selector at each budget")
    w("")
    w(f"For each budget, each selector's instance with the highest model mean mass recall R, {pooled_word}; "
      "ranked by R. _p10_, _p50_: percentiles of per-row recall; _vs oracle_: R / per-head oracle R; "
      "_sparsity_: realised, 1 - attended / causal keys; _KV_: resident KV cache of the whole model (bf16, "
      "batch 1, K/V + metadata), _x full_: full attention / KV; _of_: instances of the selector with a value.")
    w("")
    best = sweep_best_table(report)
    for b in report.budget_values:
        group = [r for r in best if r["budget"] == float(b)]
        if not group:
            continue
        w(f"### {report.describe_budget(float(b))}")
        w("")
        w("| rank | selector | best instance | R | p10 | p50 | vs oracle | sparsity | KV | x full | of |")
        w("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rank, r in enumerate(group, 1):
            w(f"| {rank} | {_md(r['selector'])} | {_md(r['label'])} | {_fmt(r['mass_recall'], 4)} | "
              f"{_fmt(r['mass_recall_p10'], 3)} | {_fmt(r['mass_recall_p50'], 3)} | {_fmt(r['recall_vs_oracle'], 4)} | "
              f"{_fmt(r['sparsity'], 3)} | {_bytes(r['kv_bytes']) if np.isfinite(r['kv_bytes']) else '-'} | "
              f"{_fmt(r['kv_ratio'], 2)} | {r['instances']} |")
        w("")
    frontier = sweep_frontier(report, report.pooled_rows())
    label_of = {int(i): ln.label for ln in lines for i in ln.rows}
    w("## Pareto frontier: recall vs KV bytes")
    w("")
    w(f"The points ({pooled_word}) that no other point beats with at least the recall for no more resident KV "
      "bytes, from the smallest cache up (figure `sweep_pareto`).")
    w("")
    w("| # | instance | budget | R | KV | x full | sparsity |")
    w("|---:|---|---:|---:|---:|---:|---:|")
    for n, i in enumerate(frontier, 1):
        w(f"| {n} | {_md(label_of.get(i, '?'))} | {_md(budget_text(report, float(pts['budget'][i])))} | "
          f"{_fmt(float(pts['mass_recall'][i]), 4)} | {_bytes(float(pts['kv_bytes'][i]))} | "
          f"{_fmt(float(pts['kv_ratio'][i]), 2)} | {_fmt(float(pts['sparsity'][i]), 3)} |")
    w("")
    if C > 1:
        w("## Per capture")
        w("")
        w("Each selector's best model mean mass recall R per capture and pooled (the instance may differ between "
          "columns).")
        w("")
        names = [report.capture_name(c) for c in range(C)] + ["pooled"]
        w("| budget | selector | " + " | ".join(_md(n) for n in names) + " |")
        w("|---|---|" + "---:|" * len(names))
        tables = [sweep_best_table(report, report.capture_rows(c)) for c in range(C)] + [best]
        for b in report.budget_values:
            fams = [r["selector"] for r in best if r["budget"] == float(b)]
            for fam in fams:
                cells = []
                for t in tables:
                    hit = [r for r in t if r["budget"] == float(b) and r["selector"] == fam]
                    cells.append(_fmt(hit[0]["mass_recall"], 4) if hit else "-")
                w(f"| {_md(budget_text(report, float(b)))} | {_md(fam)} | " + " | ".join(cells) + " |")
        w("")
    _figure_index(figures, skipped, formats, figures_dir, w)
    return "\n".join(out)
