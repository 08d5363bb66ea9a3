"""Command line: figures and a Markdown summary of one hysparse report.

    python3 -m analysis REPORT --out DIR [--budget B] [--layer L] [--formats png,pdf]

REPORT is a replay report ('hysparse replay', every figure), a sweep report ('hysparse sweep':
recall vs sparsity, the Pareto view and, with several captures, a per-capture figure; --budget picks
the per-capture figure's budget, --layer does not apply) or a KV-accounting report ('hysparse kv -o',
the KV figures and table only; --budget and --layer do not apply to it).
Run from the repository root (analysis/ is a package there). Exit codes follow the C++ tool:
0 success, 1 internal error or missing Python packages, 2 bad input (not a report, unknown
format_version, a budget or layer the report does not have; one line on stderr),
4 output not writable, 7 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 7
FORMATS = ("png", "pdf", "svg")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m analysis",
        description="Figures (PNG + PDF) and a Markdown summary (summary.md) of a hysparse replay report, a sweep "
                    "report of 'hysparse sweep' (recall vs sparsity, Pareto, per capture), or a KV-accounting "
                    "report of 'hysparse kv -o' (KV figures and table only).")
    p.add_argument("report", help="hysparse report (HDF5, format 'hysparse-report', 'hysparse-sweep' or "
                                  "'hysparse-kv-report')")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--budget", help="budget of the per-layer heatmap and the per-head box plot (sweep: of the "
                                    "per-capture figure), by label or value (e.g. 256, s=0.9, 0.9); default: the "
                                    "middle budget (sweep: up to three budgets)")
    p.add_argument("--layer", type=int, help="layer of the per-head box plot; default: the first sparse layer of "
                                             "hysparse, else the middle layer")
    p.add_argument("--formats", default="png,pdf",
                   help="comma-separated figure formats among png, pdf, svg (default: png,pdf)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _fail(code: int, message: str) -> int:
    print(f"analysis: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        return _fail(EXIT_BAD_INPUT, f"--formats {args.formats!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    try:
        from .report import ReportError, load_report
        from . import figures as figs
        from .summary import summary_markdown, write_text_atomic
    except ImportError as e:
        return _fail(EXIT_INTERNAL, f"{e} (python: {sys.executable})")

    try:
        report = load_report(args.report)
    except ReportError as e:
        return _fail(EXIT_BAD_INPUT, str(e))

    sweep = getattr(report, "is_sweep", False)
    sweep_budgets = None
    if sweep:
        if args.layer is not None:
            return _fail(EXIT_BAD_INPUT, f"{args.report}: --layer does not apply to a sweep report (no per-layer "
                                         "figures); expected a replay report")
        if args.budget is not None:
            from .report import _parse_number
            text = args.budget.strip()
            value = _parse_number(text[2:] if text.lower().startswith("s=") else text)
            hits = [float(b) for b in report.budget_values if value is not None and
                    abs(float(b) - value) <= 1e-9 * max(1.0, abs(value))]
            if not hits:
                from .sweep_figures import budget_text
                return _fail(EXIT_BAD_INPUT, f"{args.report}: budget {text!r} is not in the sweep; available: "
                                             + ", ".join(budget_text(report, float(b)) for b in report.budget_values))
            sweep_budgets = hits[:1]
    if report.is_kv_report:
        for option, value in (("--budget", args.budget), ("--layer", args.layer)):
            if value is not None:
                return _fail(EXIT_BAD_INPUT, f"{args.report}: {option} does not apply to a KV-accounting report "
                                             f"(no budgets or per-layer figures); expected a replay report")
    budget_index = None
    if args.budget is not None and not sweep:
        try:
            budget_index = report.budgets.index(args.budget)
        except ValueError as e:
            return _fail(EXIT_BAD_INPUT, f"{args.report}: {e}")
    if args.layer is not None and not sweep and not 0 <= args.layer < report.num_layers:
        return _fail(EXIT_BAD_INPUT, f"{args.report}: layer {args.layer} is not in the report; expected 0 to "
                                     f"{report.num_layers - 1}")

    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return _fail(EXIT_OUTPUT, f"{out}: output directory not writable ({e.strerror or e})")

    try:
        if sweep:
            from .sweep_figures import render_sweep
            rendered, skipped = render_sweep(report, out, budgets=sweep_budgets, formats=formats)
        else:
            rendered, skipped = figs.render_all(report, out, budget_index=budget_index, layer=args.layer,
                                                formats=formats)
        text = summary_markdown(report, rendered, skipped, formats=formats)
        summary_path = os.path.join(out, "summary.md")
        write_text_atomic(summary_path, text)
    except OSError as e:
        return _fail(EXIT_OUTPUT, f"{out}: cannot write output ({e})")
    if not args.quiet:
        names = ", ".join(r.name for r in rendered)
        print(f"wrote {summary_path} and {len(rendered)} figures ({names}) as {'+'.join(formats)}")
        if sweep and report.is_partial:
            print(f"  warning: partial sweep ({report.units_done} of {report.units_total} work units done)")
        for name, reason in skipped:
            print(f"  skipped {name}: {reason}")
    return EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(_fail(EXIT_INTERRUPTED, "interrupted"))
