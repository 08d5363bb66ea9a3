"""Analysis of hysparse reports (replay, sweep and KV accounting): one loader, paper-ready figures and a Markdown summary.

    from analysis import load_report          # analysis.report: the only module that uses h5py
    report = load_report("r.h5")
    report.selector("oracle").metric("mass_recall", "model")   # numpy array over budgets

Command line (from the repository root): ``python3 -m analysis REPORT --out DIR [--budget B] [--layer L]``.

The names below are imported lazily, so ``python3 -m analysis`` can report missing packages
(h5py, numpy, matplotlib) in one line instead of a traceback.
"""

_EXPORTS = ("METRICS", "RECALL_QUANTILES", "REPORT_FORMAT", "KV_REPORT_FORMAT", "SWEEP_FORMAT", "SUPPORTED_FORMAT_VERSIONS",
            "SUPPORTED_KV_FORMAT_VERSIONS", "Array", "Budgets", "KvTable", "Report", "ReportError", "Reuse",
            "Selector", "SweepInstance", "SweepPoints", "SweepReport", "load_report", "load_sweep", "parse_spec")

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from . import report
        return getattr(report, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
