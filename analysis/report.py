"""Loader for hysparse HDF5 reports: replay, sweep and KV-accounting reports.

`load_report(path)` is the only place in the analysis package that touches h5py.
It validates the file (HDF5, ``format`` one of ``"hysparse-report"`` (replay,
``Report.kind == "replay"``), ``"hysparse-sweep"`` (``hysparse sweep``, a
`SweepReport`, ``kind == "sweep"``) or ``"hysparse-kv-report"`` (``hysparse kv -o``,
``Report.kind == "kv"``), a supported ``format_version``, the structure of that
version) and returns a `Report` or `SweepReport`: plain Python metadata and
read-only numpy arrays, named and carrying their units, for plotting and summary code.

A sweep report holds one flat table of points (``SweepReport.points``: one row per
capture or pooled, selector instance and budget; every column a named array), the
same values on an N-d grid (``SweepReport.grid``), the work units, and under
``/captures/<c>/`` one replay report per capture (``SweepReport.captures``, each a
`Report` loaded by the replay loader).

A KV-accounting report has no selectors, budgets or query rows: its `Report` has
empty ones, and ``Report.kv`` holds its method x context table (datasets at the
file's root, or under /kv).

Any problem with the input raises `ReportError`, whose message is one line:
``FILE: what is wrong; expected what``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

try:
    import numpy as np
    import h5py
except ImportError as _e:  # pragma: no cover - depends on the interpreter
    raise ImportError(
        f"the hysparse analysis package needs numpy, h5py and matplotlib ({_e}); use /usr/bin/python3 on "
        "Debian/Ubuntu (python3-h5py, python3-matplotlib) or 'pip install h5py numpy matplotlib'") from _e

__all__ = [
    "REPORT_FORMAT",
    "KV_REPORT_FORMAT",
    "SWEEP_FORMAT",
    "SUPPORTED_FORMAT_VERSIONS",
    "SUPPORTED_SWEEP_FORMAT_VERSIONS",
    "SUPPORTED_KV_FORMAT_VERSIONS",
    "METRICS",
    "RECALL_QUANTILES",
    "ReportError",
    "Array",
    "Budgets",
    "Selector",
    "Reuse",
    "KvTable",
    "Report",
    "SweepPoints",
    "SweepInstance",
    "SweepReport",
    "SWEEP_AXES",
    "SWEEP_PARAM_AXES",
    "SWEEP_METRIC_COLUMNS",
    "load_report",
    "load_sweep",
    "parse_spec",
]

REPORT_FORMAT = "hysparse-report"
SUPPORTED_FORMAT_VERSIONS = (1,)
KV_REPORT_FORMAT = "hysparse-kv-report"
SUPPORTED_KV_FORMAT_VERSIONS = (1,)
SWEEP_FORMAT = "hysparse-sweep"
SUPPORTED_SWEEP_FORMAT_VERSIONS = (1,)
# format -> (Report.kind, supported format_version values)
_READABLE_FORMATS = {REPORT_FORMAT: ("replay", SUPPORTED_FORMAT_VERSIONS),
                     SWEEP_FORMAT: ("sweep", SUPPORTED_SWEEP_FORMAT_VERSIONS),
                     KV_REPORT_FORMAT: ("kv", SUPPORTED_KV_FORMAT_VERSIONS)}
_EXPECTED_FORMATS = f"format='{REPORT_FORMAT}', '{SWEEP_FORMAT}' or '{KV_REPORT_FORMAT}'"

# Sweep report, format_version 1: the columns of /sweep/points (name -> "i" int64, "f" float64, "s" string).
SWEEP_ID_COLUMNS = {"capture": "i", "capture_path": "s", "selector": "s", "spec": "s", "label": "s", "block": "i",
                    "window": "i", "sinks": "i", "schedule": "s", "group": "s", "budget": "f", "budget_kind": "s"}
SWEEP_METRIC_COLUMNS = ("sparsity", "mass_recall", "mass_recall_p10", "mass_recall_p50", "mass_recall_min",
                        "mass_recall_sparse_layers", "recall_vs_oracle", "topk_overlap", "attended_keys",
                        "budget_keys", "output_rel_error", "kv_bytes", "kv_full_bytes", "kv_ratio")
SWEEP_AXES = ("capture", "selector", "block", "window", "sinks", "schedule", "group", "budget")
# The axes that tell the instances of one selector apart (legend text, facets).
SWEEP_PARAM_AXES = ("block", "window", "sinks", "schedule", "group")
SWEEP_UNIT_COLUMNS = ("capture", "layer", "done", "seconds")

# Per selector x budget x layer x head metrics (README, "Replay: definitions").
# output_rel_error is present only when v was captured (and not switched off).
METRICS = ("mass_recall", "recall_vs_oracle", "topk_overlap", "attended_keys", "budget_keys", "output_rel_error")
OPTIONAL_METRICS = ("output_rel_error",)
RECALL_QUANTILES = ("p10", "p50", "min")

_KNOWN_FORMATS = {
    "hysparse-capture": "a hysparse capture, not a report (run 'hysparse replay' on it to make a report)",
}


class ReportError(Exception):
    """A file that is not a readable hysparse report. ``str(e)`` is one line."""

    def __init__(self, path: Union[str, os.PathLike], problem: str, expected: str):
        self.path = os.fspath(path)
        self.problem = _one_line(problem)
        self.expected = _one_line(expected)
        super().__init__(f"{self.path}: {self.problem}; expected {self.expected}")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------
# Value types handed to plotting code.
# ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Array:
    """One dataset: read-only values with their dimension names, units and description."""

    path: str                 # HDF5 path, e.g. "/selectors/oracle/mass_recall_mean"
    values: np.ndarray        # read-only; float64 for real data, int64 for integers, str for string columns
    dims: Tuple[str, ...]     # e.g. ("budget", "layer", "head")
    units: str
    long_name: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.values.shape)


@dataclass(frozen=True, eq=False)
class Budgets:
    """The budget axis: token budgets (``kind == "tokens"``) or sparsities (``kind == "sparsity"``)."""

    values: np.ndarray          # float64, in report order
    kind: str                   # "tokens" | "sparsity"
    units: str                  # "tokens" | "1"
    labels: Tuple[str, ...]     # e.g. ("128", "256") or ("s=0.95", "s=0.9")
    long_name: str

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[str]:
        return iter(self.labels)

    @property
    def is_tokens(self) -> bool:
        return self.kind == "tokens"

    @property
    def is_sparsity(self) -> bool:
        return self.kind == "sparsity"

    def default_index(self) -> int:
        """The middle budget (upper middle for an even count)."""
        return len(self) // 2

    def describe(self, i: int) -> str:
        """Human-readable budget, e.g. "256 tokens" or "sparsity 0.9"."""
        if self.is_tokens:
            return f"{self.labels[i]} tokens"
        return f"sparsity {self.values[i]:g}"

    def index(self, budget: Union[str, int, float]) -> int:
        """Index of a budget given by label ("256", "s=0.9", "4K") or value (256, 0.9).

        Raises ValueError naming the available budgets.
        """
        text = str(budget).strip()
        for i, label in enumerate(self.labels):
            if text == label:
                return i
        candidates = [text]
        if text.lower().startswith("s="):
            candidates.append(text[2:])
        for cand in candidates:
            value = _parse_number(cand)
            if value is None:
                continue
            for i, v in enumerate(self.values):
                if np.isclose(v, value, rtol=1e-9, atol=1e-12):
                    return i
        raise ValueError(f"budget {text!r} is not in the report; available: {', '.join(self.labels)}")


def _parse_number(text: str) -> Optional[float]:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        return None
    scale = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]
    return float(m.group(1)) * scale


def parse_spec(spec: str) -> Tuple[str, Dict[str, str]]:
    """``"oracle:block=64,group=sum"`` -> ``("oracle", {"block": "64", "group": "sum"})``."""
    name, _, rest = spec.partition(":")
    params: Dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = value.strip()
    return name.strip(), params


@dataclass(frozen=True, eq=False)
class Selector:
    """One selector of a report: its attributes and every dataset of its group."""

    label: str                  # unique label in the report ("oracle", "oracle_2", ...)
    name: str                   # selector family from the spec ("oracle", "swa", "hysparse", ...)
    spec: str                   # canonical spec with every parameter
    params: Dict[str, str]      # parsed spec parameters
    description: str
    block_size: int
    sinks: int
    window: int                 # -1 when the window is the budget (window_is_budget)
    window_is_budget: bool
    selection: str              # "per query head" | "shared by the heads of a KV group"
    is_full_layer: np.ndarray   # bool [layer]
    arrays: Dict[str, Array]    # dataset name -> Array (e.g. "layer_mass_recall_mean")
    attrs: Dict[str, Any] = field(default_factory=dict)

    @property
    def shared_by_group(self) -> bool:
        return self.selection.startswith("shared")

    @property
    def full_layers(self) -> np.ndarray:
        return np.flatnonzero(self.is_full_layer)

    @property
    def sparse_layers(self) -> np.ndarray:
        return np.flatnonzero(~self.is_full_layer)

    @property
    def has_full_layers(self) -> bool:
        return bool(self.is_full_layer.any())

    def has(self, dataset: str) -> bool:
        return dataset in self.arrays

    def get(self, dataset: str) -> Optional[Array]:
        return self.arrays.get(dataset)

    def __getitem__(self, dataset: str) -> np.ndarray:
        try:
            return self.arrays[dataset].values
        except KeyError:
            raise KeyError(f"selector {self.label!r} has no dataset {dataset!r}; it has: "
                           f"{', '.join(sorted(self.arrays))}") from None

    @staticmethod
    def dataset_name(metric: str, level: str = "head", stat: str = "mean", sparse_layers: bool = False) -> str:
        """Name of a metric dataset.

        level: "head" [budget, layer, head], "layer" [budget, layer] or "model" [budget];
        stat: "mean" for every metric, or "p10" / "p50" / "min" for mass_recall;
        sparse_layers: the model mean over the selector's sparse layers only.
        """
        if level not in ("head", "layer", "model"):
            raise ValueError(f"level must be head, layer or model, not {level!r}")
        prefix = {"head": "", "layer": "layer_", "model": "model_"}[level]
        name = f"{prefix}{metric}_{stat}"
        if sparse_layers:
            if level != "model" or stat != "mean":
                raise ValueError("sparse_layers exists only for model-level means")
            name += "_sparse_layers"
        return name

    def metric(self, metric: str, level: str = "head", stat: str = "mean",
               sparse_layers: bool = False) -> Optional[np.ndarray]:
        """A metric's array, or None when the report does not have it (e.g. output_rel_error)."""
        a = self.arrays.get(self.dataset_name(metric, level, stat, sparse_layers))
        return None if a is None else a.values

    @property
    def saturated_rows(self) -> np.ndarray:
        return self["saturated_rows"]


@dataclass(frozen=True, eq=False)
class Reuse:
    """Cross-layer reuse matrix ``mass_recall[f, l]``, NaN where f > l."""

    mass_recall: np.ndarray     # [source_layer, layer]
    budget_tokens: int
    block_size: int
    units: str
    long_name: str

    def masked(self) -> np.ma.MaskedArray:
        """The matrix with f > l (and any non-finite value) masked."""
        m = self.mass_recall
        f, l = np.indices(m.shape)
        return np.ma.masked_array(m, mask=(f > l) | ~np.isfinite(m))


@dataclass(frozen=True, eq=False)
class KvTable:
    """KV-cache accounting: datasets over method x context (x layer).

    Loaded from a report's /kv group when present (``Report.kv``); ``None`` otherwise.
    """

    group: str
    methods: Tuple[str, ...]
    contexts: np.ndarray                    # int64 tokens
    layers: Optional[np.ndarray]
    arrays: Dict[str, Array]                # name -> Array, dims ("method", "context"[, "layer"])
    attrs: Dict[str, Any]                   # the group's attributes (model, dtype, batch, ...)
    method_attrs: Dict[str, Any]            # attributes of the method axis (resolved, source, ...)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name].values
        except KeyError:
            raise KeyError(f"KV table has no dataset {name!r}; it has: {', '.join(sorted(self.arrays))}") from None

    def has(self, name: str) -> bool:
        return name in self.arrays

    @property
    def batch(self) -> int:
        """Sequences per batch (whole-batch datasets divide by it to give one sequence); 1 when not recorded."""
        b = self.attrs.get("batch", 1)
        return int(b) if isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 1 else 1

    def method_index(self, method: str) -> Optional[int]:
        """Index of a method by its name as given ("hysparse", "quest:page=32"), or None."""
        try:
            return self.methods.index(method)
        except ValueError:
            return None

    def context_index(self, tokens: int) -> Optional[int]:
        """Index of a context length in tokens, or None."""
        hits = np.flatnonzero(self.contexts == int(tokens))
        return int(hits[0]) if hits.size else None

    def method_attr(self, key: str, i: int) -> Optional[str]:
        """One method's entry of a list attribute of the method axis ("resolved", "schedule", "source")."""
        values = self.method_attrs.get(key)
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or len(values) != len(self.methods):
            return None
        return str(values[i])

    def full_attention_bytes(self) -> Optional[np.ndarray]:
        """Whole-batch K/V of the model with every layer full, per context: the `full_attention_bytes`
        dataset (the same for every method), else the resident bytes of a method named "full"; None
        when the table has neither."""
        if "full_attention_bytes" in self.arrays and self.arrays["full_attention_bytes"].values.ndim == 2:
            return self.arrays["full_attention_bytes"].values[0]
        i = self.method_index("full")
        if i is not None and "resident_bytes" in self.arrays:
            return self.arrays["resident_bytes"].values[i]
        return None


@dataclass(frozen=True, eq=False)
class Report:
    """A loaded hysparse report. Arrays are read-only numpy arrays; metadata are Python values."""

    path: str
    format_version: int
    provenance: Dict[str, Any]      # root attributes: tool, tool_version, git_sha, created_utc, ...
    config: Dict[str, Any]          # /config (parsed from its json attribute)
    capture: Dict[str, Any]         # /capture attributes (model, num_layers, ...)
    budgets: Budgets
    layers: np.ndarray              # int64 [layer]
    heads: np.ndarray               # int64 [head]
    query_positions: np.ndarray     # int64 [row]
    selectors: Dict[str, Selector]  # label -> Selector, in the report's order (empty for a KV report)
    reuse: Optional[Reuse]
    kv: Optional[KvTable]
    kind: str = "replay"            # "replay" (format hysparse-report) | "kv" (format hysparse-kv-report)
    kv_full_bytes: Optional[float] = None   # /selectors attribute kv_full_bytes (newer tools), else None
    group: str = "/"                # where the report lives in the file ("/captures/<c>" inside a sweep)

    @property
    def is_sweep(self) -> bool:
        return False

    @property
    def is_kv_report(self) -> bool:
        """A KV-accounting report of 'hysparse kv -o': no selectors or budgets, only `kv`."""
        return self.kind == "kv"

    @property
    def selector_order(self) -> Tuple[str, ...]:
        return tuple(self.selectors)

    def selector(self, label: str) -> Selector:
        try:
            return self.selectors[label]
        except KeyError:
            raise KeyError(f"no selector {label!r}; the report has: {', '.join(self.selectors)}") from None

    def selectors_named(self, name: str) -> List[Selector]:
        """Every selector of one family (e.g. all "hysparse" variants), in order."""
        return [s for s in self.selectors.values() if s.name == name]

    @property
    def hysparse(self) -> Optional[Selector]:
        """The first selector of the hysparse family, or None."""
        found = self.selectors_named("hysparse")
        return found[0] if found else None

    @property
    def has_output_error(self) -> bool:
        return bool(self.selectors) and all(s.has("output_rel_error_mean") for s in self.selectors.values())

    @property
    def num_layers(self) -> int:
        return int(self.layers.size)

    @property
    def num_heads(self) -> int:
        return int(self.heads.size)

    @property
    def num_rows(self) -> int:
        return int(self.query_positions.size)

    @property
    def input_files(self) -> List[str]:
        files = self.provenance.get("input_files")
        if isinstance(files, str):
            return [files]
        if files:
            return [str(f) for f in files]
        path = self.capture.get("path")
        return [str(path)] if path else []

    @property
    def input_name(self) -> str:
        files = self.input_files
        return ", ".join(os.path.basename(f) for f in files) if files else "(unknown input)"

    def provenance_line(self) -> str:
        """Short one-line provenance: tool version, git sha, creation time, input file."""
        p = self.provenance
        sha = str(p.get("git_sha", "unknown"))
        dirty = sha.endswith("-dirty")
        short = sha[:-len("-dirty")] if dirty else sha
        short = short[:12] + ("-dirty" if dirty else "")
        tool = p.get("tool", "hysparse")
        return (f"{tool} {p.get('tool_version', '?')} (git {short}), {p.get('created_utc', '?')}, "
                f"input {self.input_name}")


@dataclass(frozen=True, eq=False)
class SweepInstance:
    """One selector instance of a sweep: a selector with every parameter fixed (spec), on one schedule."""

    selector: str       # name, e.g. "hysparse"
    spec: str           # resolved spec with every parameter
    label: str          # the instance's group name under /captures/<c>/selectors/
    block: int
    window: int         # -1: the window is the budget (swa)
    sinks: int
    schedule: str       # "" where the selector has none
    group: str          # "" where the selector has none

    @property
    def key(self) -> Tuple[Any, ...]:
        return (self.selector, self.spec, self.block, self.window, self.sinks, self.schedule, self.group)

    def param(self, axis: str) -> str:
        """The value of one parameter axis as text ("budget" for window -1, "" where it does not apply)."""
        v = getattr(self, axis)
        if axis == "window" and v < 0:
            return "budget"
        return str(v)

    def params_text(self, axes: Sequence[str]) -> str:
        """e.g. "block=64 window=128" for the given axes (those that apply to this selector)."""
        return " ".join(f"{a}={self.param(a)}" for a in axes if self.param(a) != "")


@dataclass(frozen=True, eq=False)
class SweepPoints:
    """/sweep/points: a flat table, one row per (capture or pooled, selector instance, budget).

    ``points["mass_recall"]`` is a read-only numpy column (float64, int64 or str); ``points.column(name)``
    the `Array` with its units and long name.
    """

    columns: Dict[str, Array]

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).values.size) if self.columns else 0

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name].values
        except KeyError:
            raise KeyError(f"the sweep points have no column {name!r}; they have: "
                           f"{', '.join(self.columns)}") from None

    def column(self, name: str) -> Array:
        return self.columns[name]

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.columns)

    def instance_at(self, row: int) -> SweepInstance:
        c = self.columns
        return SweepInstance(selector=str(c["selector"].values[row]), spec=str(c["spec"].values[row]),
                             label=str(c["label"].values[row]), block=int(c["block"].values[row]),
                             window=int(c["window"].values[row]), sinks=int(c["sinks"].values[row]),
                             schedule=str(c["schedule"].values[row]), group=str(c["group"].values[row]))

    def instances(self, rows: Optional[np.ndarray] = None) -> List[Tuple[SweepInstance, np.ndarray]]:
        """The selector instances among `rows` (indices or a bool mask; default all) in order of first
        appearance, each with its row indices sorted by budget."""
        idx = np.arange(len(self)) if rows is None else np.asarray(rows)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        found: Dict[Tuple[Any, ...], Tuple[SweepInstance, List[int]]] = {}
        for i in idx.tolist():
            inst = self.instance_at(i)
            found.setdefault(inst.key, (inst, []))[1].append(i)
        budget = self["budget"]
        out = []
        for inst, members in found.values():
            m = np.array(members, dtype=np.int64)
            out.append((inst, m[np.argsort(budget[m], kind="stable")]))
        return out


@dataclass(frozen=True, eq=False)
class SweepReport:
    """A loaded sweep report ('hysparse sweep', format hysparse-sweep)."""

    path: str
    format_version: int
    provenance: Dict[str, Any]          # root attributes
    config: Dict[str, Any]              # /config json: the resolved sweep configuration
    status: str                         # "complete" | "partial"
    units_total: int
    units_done: int
    budget_kind: str                    # "tokens" | "sparsity"
    points: SweepPoints                 # /sweep/points
    axes: Dict[str, Array]              # /sweep/axes/<name>: capture, selector, block, ..., budget
    capture_labels: Tuple[str, ...]     # /sweep/axes/capture attribute labels: capture paths, then "pooled"
    grid: Dict[str, Array]              # /sweep/grid/<column>, dims SWEEP_AXES
    units: Dict[str, Array]             # /sweep/units/{capture,layer,done,seconds}
    captures: List[Optional[Report]]    # /captures/<c>, each a replay report (None: not started, partial sweeps)
    sweep_attrs: Dict[str, Any] = field(default_factory=dict)
    kind: str = "sweep"

    @property
    def is_kv_report(self) -> bool:
        return False

    @property
    def is_sweep(self) -> bool:
        return True

    @property
    def is_partial(self) -> bool:
        return self.status != "complete"

    @property
    def num_captures(self) -> int:
        """Captures in the sweep (started or not)."""
        return len(self.captures)

    def capture_seq_len(self, c: int) -> Optional[int]:
        cap = self.captures[c] if 0 <= c < len(self.captures) else None
        n = cap.capture.get("seq_len") if cap is not None else None
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def budget_values(self) -> np.ndarray:
        return self.axes["budget"].values

    def budget_label(self, value: float) -> str:
        return f"{value:g}" if self.budget_kind == "tokens" else f"s={value:g}"

    def describe_budget(self, value: float) -> str:
        return f"{value:g} tokens" if self.budget_kind == "tokens" else f"sparsity {value:g}"

    def pooled_rows(self) -> np.ndarray:
        """Row indices pooled over every capture (capture == -1); with a single capture and no pooled rows,
        that capture's rows."""
        cap = self.points["capture"]
        rows = np.flatnonzero(cap == -1)
        if rows.size == 0 and self.num_captures == 1:
            rows = np.flatnonzero(cap == 0)
        return rows

    def capture_rows(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.points["capture"] == c)

    def capture_name(self, c: int) -> str:
        """Short name of capture c (its file name), or "pooled" for -1."""
        if c < 0:
            return "pooled"
        if c < len(self.capture_labels):
            return os.path.basename(self.capture_labels[c]) or self.capture_labels[c]
        return f"capture {c}"

    @property
    def input_files(self) -> List[str]:
        files = self.provenance.get("input_files")
        if isinstance(files, str):
            return [files]
        if files:
            return [str(f) for f in files]
        return [str(c.capture.get("path", "")) for c in self.captures if c is not None and c.capture.get("path")]

    @property
    def input_name(self) -> str:
        files = self.input_files
        if not files:
            return "(unknown input)"
        names = [os.path.basename(f) for f in files]
        if len(names) <= 3:
            return ", ".join(names)
        return f"{len(names)} captures ({', '.join(names[:2])}, ...)"

    def provenance_line(self) -> str:
        line = Report.provenance_line(self)  # type: ignore[arg-type]  # the same fields
        if self.is_partial:
            line += f" [PARTIAL sweep: {self.units_done} of {self.units_total} work units]"
        return line


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------

def _py(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (str, int, float, bool, list)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _py(value[()])
        return [_py(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if h5py is not None and isinstance(value, h5py.Empty):
        return None
    return value


def _attrs(obj: Any, skip: Sequence[str] = ("CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST",
                                             "DIMENSION_LABELS", "_Netcdf4Dimid")) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in obj.attrs:
        if key in skip:
            continue
        out[key] = _py(obj.attrs[key])
    return out


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


class _Reader:
    """Reads one open file, turning every structural problem into a ReportError."""

    def __init__(self, path: str, f: Any, prefix: str = "", what: str = "report"):
        self.path = path
        self.f = f
        self.prefix = prefix.rstrip("/")   # "" for the file's root, "/captures/0" for a capture of a sweep
        self.what = what                   # "report" or "sweep report", for messages

    def sub(self, prefix: str) -> "_Reader":
        """A reader of the replay report stored under `prefix` (absolute) of the same file."""
        return _Reader(self.path, self.f, prefix, self.what)

    def fail(self, problem: str, expected: str) -> "ReportError":
        return ReportError(self.path, problem, expected)

    def full(self, name: str) -> str:
        return self.prefix + name if name.startswith("/") else f"{self.prefix}/{name}"

    def group(self, name: str, required: bool = True) -> Any:
        name = self.full(name) or "/"
        obj = self.f.get(name)
        if obj is None:
            if required:
                raise self.fail(f"missing group '{name}'",
                                f"a complete format_version 1 {self.what} ('{name}' group)")
            return None
        if not isinstance(obj, h5py.Group):
            raise self.fail(f"'{name}' is not a group", "a group")
        return obj

    def dataset(self, name: str, required: bool = True) -> Any:
        name = self.full(name)
        obj = self.f.get(name)
        if obj is None:
            if required:
                raise self.fail(f"missing dataset '{name}'", f"a complete format_version 1 {self.what}")
            return None
        if not isinstance(obj, h5py.Dataset):
            raise self.fail(f"'{name}' is not a dataset", "a dataset")
        return obj

    def numbers(self, ds: Any, ndim: Optional[int] = None) -> np.ndarray:
        if ds.dtype.kind not in "iufb":
            raise self.fail(f"dataset '{ds.name}' has type {ds.dtype}", "numbers")
        values = np.asarray(ds[()])
        if ndim is not None and values.ndim != ndim:
            raise self.fail(f"dataset '{ds.name}' has {values.ndim} dimensions {values.shape}", f"{ndim}")
        if values.dtype.kind == "f":
            values = values.astype(np.float64)
        elif values.dtype.kind in "iub":
            values = values.astype(np.int64)
        return _readonly(values)

    def strings(self, ds: Any) -> List[str]:
        if ds.dtype.kind not in "OSU":
            raise self.fail(f"dataset '{ds.name}' has type {ds.dtype}", "strings")
        raw = ds[()]
        if isinstance(raw, np.ndarray):
            return [_py(v) if not isinstance(v, str) else v for v in raw.tolist()]
        return [_py(raw)]

    def column(self, ds: Any, kind: str) -> Array:
        """A 1-D table column: "i" int64, "f" float64 or "s" strings (a read-only numpy str array)."""
        if ds.ndim != 1:
            raise self.fail(f"dataset '{ds.name}' has {ds.ndim} dimensions {ds.shape}", "a 1-D column")
        if kind == "s":
            values = _readonly(np.array(self.strings(ds), dtype=str))
            a = ds.attrs
            dims = ds.attrs.get("DIMENSION_LABELS")
            return Array(path=ds.name, values=values,
                         dims=tuple(str(_py(d)) for d in np.atleast_1d(dims)) if dims is not None else ("point",),
                         units=str(_py(a["units"])) if "units" in a else "",
                         long_name=str(_py(a["long_name"])) if "long_name" in a else "")
        arr = self.array(ds)
        if kind == "i" and arr.values.dtype.kind != "i":
            raise self.fail(f"dataset '{ds.name}' has type {ds.dtype}", "integers")
        if kind == "f" and arr.values.dtype.kind != "f":
            values = _readonly(arr.values.astype(np.float64))
            arr = Array(arr.path, values, arr.dims, arr.units, arr.long_name)
        if arr.dims and arr.dims[0].startswith("dim"):
            arr = Array(arr.path, arr.values, ("point",), arr.units, arr.long_name)
        return arr

    def array(self, ds: Any) -> Array:
        dims = ds.attrs.get("DIMENSION_LABELS")
        dims_t: Tuple[str, ...]
        if dims is not None:
            dims_t = tuple(str(_py(d)) for d in np.atleast_1d(dims))
        else:
            dims_t = tuple(d.label or f"dim{i}" for i, d in enumerate(ds.dims))
        a = ds.attrs
        return Array(path=ds.name, values=self.numbers(ds), dims=dims_t,
                     units=str(_py(a["units"])) if "units" in a else "",
                     long_name=str(_py(a["long_name"])) if "long_name" in a else "")

    def check_shape(self, arr: Array, expected: Tuple[int, ...], dims: Tuple[str, ...]) -> None:
        if arr.shape != expected:
            shape = " x ".join(f"{d} {n}" for d, n in zip(dims, expected))
            raise self.fail(f"dataset '{arr.path}' has shape {arr.shape}", f"[{shape}]")


def load_report(path: Union[str, os.PathLike]) -> Report:
    """Open and validate a hysparse report; raise ReportError for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ReportError(path, "no such file", "a hysparse report (HDF5 file)")
    if os.path.isdir(path):
        raise ReportError(path, "is a directory", "a hysparse report (HDF5 file)")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise ReportError(path, f"cannot be read ({e})", "a readable hysparse report") from None
    if not is_hdf5:
        raise ReportError(path, "not an HDF5 file", f"a hysparse report (HDF5 with {_EXPECTED_FORMATS})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ReportError(path, f"cannot be opened as HDF5 ({e})", "a readable hysparse report") from None
    try:
        with f:
            return _load(_Reader(path, f))
    except ReportError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
        raise ReportError(path, f"cannot be read ({type(e).__name__}: {e})",
                          f"a well-formed format_version {SUPPORTED_FORMAT_VERSIONS[-1]} report") from None


def load_sweep(path: Union[str, os.PathLike]) -> "SweepReport":
    """`load_report` for a sweep report; any other report is a ReportError."""
    rep = load_report(path)
    if not isinstance(rep, SweepReport):
        raise ReportError(path, f"format is '{rep.provenance.get('format')}', not a sweep report",
                          f"format='{SWEEP_FORMAT}' (written by 'hysparse sweep')")
    return rep


def _load(r: _Reader) -> Union[Report, "SweepReport"]:
    f = r.f
    root = _attrs(f)
    fmt = root.get("format")
    if fmt is None:
        raise r.fail("not a hysparse report (no root attribute 'format')", _EXPECTED_FORMATS)
    if fmt not in _READABLE_FORMATS:
        what = _KNOWN_FORMATS.get(str(fmt), "not a hysparse report this analysis package reads")
        raise r.fail(f"format is '{fmt}': {what}", _EXPECTED_FORMATS)
    kind, versions = _READABLE_FORMATS[str(fmt)]
    version = root.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise r.fail(f"format_version is {version!r}", "an integer format_version")
    supported = ", ".join(str(v) for v in versions)
    if version not in versions:
        raise r.fail(f"format_version {version} is not supported by this analysis package",
                     f"format_version {supported} (update analysis/ for newer reports)")
    if kind == "kv":
        return _load_kv_report(r, root, int(version))
    if kind == "sweep":
        return _load_sweep(_Reader(r.path, r.f, "", "sweep report"), root, int(version))
    return _load_replay(r, root, int(version))


def _load_replay(r: _Reader, root: Dict[str, Any], version: int, config: Optional[Dict[str, Any]] = None,
                 capture: Optional[Dict[str, Any]] = None) -> Report:
    """A replay report at r.prefix: the file's root, or /captures/<c> of a sweep (`config` and `capture`
    then come from the sweep when the capture's group has no /config or /capture of its own)."""
    # Axes.
    budget_ds = r.dataset("/axes/budget")
    budget_values = r.numbers(budget_ds, ndim=1).astype(np.float64)
    ba = _attrs(budget_ds)
    kind = ba.get("kind") or (config or {}).get("budget_kind") or \
        _attrs(r.group("/config")).get("budget_kind", "tokens")
    if kind not in ("tokens", "sparsity"):
        raise r.fail(f"/axes/budget kind is '{kind}'", "kind 'tokens' or 'sparsity'")
    labels = ba.get("labels")
    if labels is None:
        labels = [f"{v:g}" if kind == "tokens" else f"s={v:g}" for v in budget_values]
    labels = [str(x) for x in (labels if isinstance(labels, list) else [labels])]
    if len(labels) != budget_values.size:
        raise r.fail(f"/axes/budget has {budget_values.size} values but {len(labels)} labels", "one label per budget")
    if budget_values.size == 0:
        raise r.fail("/axes/budget is empty", "at least one budget")
    budgets = Budgets(values=_readonly(budget_values), kind=str(kind),
                      units=str(ba.get("units", "tokens" if kind == "tokens" else "1")),
                      labels=tuple(labels), long_name=str(ba.get("long_name", "")))
    layers = r.numbers(r.dataset("/axes/layer"), ndim=1)
    heads = r.numbers(r.dataset("/axes/head"), ndim=1)
    qpos_ds = r.dataset("/axes/query_position", required=False)
    qpos = r.numbers(qpos_ds, ndim=1) if qpos_ds is not None else _readonly(np.zeros(0, dtype=np.int64))
    B, L, H = budgets.values.size, layers.size, heads.size
    sizes = {"budget": B, "layer": L, "head": H, "source_layer": L}

    # Config and capture.
    config_g = r.group("/config", required=config is None)
    if config_g is not None:
        config = _config(config_g)
    capture_g = r.group("/capture", required=capture is None)
    if capture_g is not None:
        capture = dict(capture or {}, **_attrs(capture_g))
    assert config is not None and capture is not None
    if "num_layers" in capture and int(capture["num_layers"]) != L:
        raise r.fail(f"/capture num_layers {capture['num_layers']} but /axes/layer has {L}", "the same layer count")

    # Selectors.
    sg = r.group("/selectors")
    order = _attrs(sg).get("order")
    if order is None:
        order = sorted(k for k in sg if isinstance(sg[k], h5py.Group))
    order = [str(x) for x in (order if isinstance(order, list) else [order])]
    if not order:
        raise r.fail("/selectors is empty", "at least one selector")
    selectors: Dict[str, Selector] = {}
    for label in order:
        g = r.group(f"/selectors/{label}")
        arrays: Dict[str, Array] = {}
        for key in g:
            obj = g[key]
            if isinstance(obj, h5py.Dataset):
                arrays[key] = r.array(obj)
        # Required datasets and their shapes.
        required: List[Tuple[str, Tuple[str, ...]]] = [("is_full_layer", ("layer",)),
                                                        ("saturated_rows", ("budget", "layer"))]
        for m in METRICS:
            if m in OPTIONAL_METRICS and f"{m}_mean" not in arrays:
                continue
            required += [(f"{m}_mean", ("budget", "layer", "head")), (f"layer_{m}_mean", ("budget", "layer")),
                         (f"model_{m}_mean", ("budget",)), (f"model_{m}_mean_sparse_layers", ("budget",))]
        for q in RECALL_QUANTILES:
            required += [(f"mass_recall_{q}", ("budget", "layer", "head")), (f"layer_mass_recall_{q}", ("budget", "layer")),
                         (f"model_mass_recall_{q}", ("budget",))]
        if "kv_resident_bytes" in arrays:  # newer tools: resident KV bytes priced by the C++ footprint table
            required.append(("kv_resident_bytes", ("budget",)))
        for name, dims in required:
            if name not in arrays:
                raise r.fail(f"missing dataset '{r.full('/selectors')}/{label}/{name}'",
                             f"a complete format_version 1 {r.what}")
            r.check_shape(arrays[name], tuple(sizes[d] for d in dims), dims)
        a = _attrs(g)
        spec = str(a.get("spec", label))
        name, params = parse_spec(spec)
        window = int(a.get("window", 0))
        full = arrays["is_full_layer"].values.astype(bool)
        full.setflags(write=False)
        selectors[label] = Selector(
            label=label, name=name or re.sub(r"_\d+$", "", label), spec=spec, params=params,
            description=str(a.get("description", "")), block_size=int(a.get("block_size", 0)),
            sinks=int(a.get("sinks", 0)), window=window,
            window_is_budget=bool(a.get("window_is_budget", window < 0)),
            selection=str(a.get("selection", "")), is_full_layer=full, arrays=arrays, attrs=a)

    # Cross-layer reuse (absent with --reuse-budget 0).
    reuse = None
    rd = r.dataset("/reuse/mass_recall", required=False)
    if rd is not None:
        arr = r.array(rd)
        r.check_shape(arr, (L, L), ("source_layer", "layer"))
        ra = _attrs(r.group("/reuse"))
        reuse = Reuse(mass_recall=arr.values, budget_tokens=int(ra.get("budget_tokens", 0)),
                      block_size=int(ra.get("block_size", 0)), units=arr.units, long_name=arr.long_name)

    kv = _load_kv(r, "/kv") if r.group("/kv", required=False) is not None else None
    if kv is not None and not kv.arrays:
        kv = None  # an empty /kv group: nothing to show

    full_bytes = _attrs(sg).get("kv_full_bytes")
    if isinstance(full_bytes, bool) or not isinstance(full_bytes, (int, float)):
        full_bytes = None
    return Report(path=r.path, format_version=int(version), provenance=root, config=config, capture=capture,
                  budgets=budgets, layers=layers, heads=heads, query_positions=qpos, selectors=selectors,
                  reuse=reuse, kv=kv, kv_full_bytes=None if full_bytes is None else float(full_bytes),
                  group=r.prefix or "/")


def _config(g: Any) -> Dict[str, Any]:
    """A /config group: its JSON document (attribute json), else its attributes."""
    config_attrs = _attrs(g)
    try:
        config = json.loads(config_attrs["json"]) if "json" in config_attrs else dict(config_attrs)
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except ValueError:
        config = {k: v for k, v in config_attrs.items() if k != "json"}
    return config


def _load_kv(r: _Reader, group: str) -> KvTable:
    """KV accounting: every dataset of `group` ("/kv", or "/" for a KV report) over [method, context(, layer)]."""
    g = r.group(group)
    prefix = group.rstrip("/")
    method_ds = r.dataset(f"{prefix}/method")
    methods = r.strings(method_ds)
    contexts = r.numbers(r.dataset(f"{prefix}/context"), ndim=1)
    layer_ds = r.dataset(f"{prefix}/layer", required=False)
    layers = r.numbers(layer_ds, ndim=1) if layer_ds is not None else None
    M, C = len(methods), contexts.size
    arrays: Dict[str, Array] = {}
    for key in g:
        obj = g[key]
        if key in ("method", "context", "layer") or not isinstance(obj, h5py.Dataset):
            continue
        if obj.dtype.kind not in "iufb" or obj.ndim < 2 or obj.shape[:2] != (M, C):
            continue  # not a method x context table
        arr = r.array(obj)
        if not arr.dims or arr.dims[0].startswith("dim"):
            arr = Array(arr.path, arr.values, ("method", "context", "layer")[:arr.values.ndim], arr.units, arr.long_name)
        arrays[key] = arr
    return KvTable(group=group, methods=tuple(methods), contexts=contexts, layers=layers, arrays=arrays,
                   attrs=_attrs(g), method_attrs=_attrs(method_ds))


def _load_kv_report(r: _Reader, root: Dict[str, Any], version: int) -> Report:
    """A 'hysparse kv -o' report: the method x context table at the root (or under /kv)."""
    f = r.f
    if isinstance(f.get("method"), h5py.Dataset):
        group = "/"
    elif isinstance(f.get("kv"), h5py.Group) and isinstance(f["kv"].get("method"), h5py.Dataset):
        group = "/kv"
    else:
        raise r.fail("missing dataset 'method' (at the root or under /kv)",
                     f"a complete {KV_REPORT_FORMAT} format_version {version} report")
    kv = _load_kv(r, group)
    if not kv.methods or kv.contexts.size == 0:
        raise r.fail(f"the KV table has {len(kv.methods)} methods and {kv.contexts.size} contexts",
                     "at least one method and one context")
    if "resident_bytes" not in kv.arrays or kv.arrays["resident_bytes"].values.ndim != 2:
        raise r.fail(f"missing dataset '{group.rstrip('/')}/resident_bytes' [method, context]",
                     f"a complete {KV_REPORT_FORMAT} format_version {version} report")
    a = kv.attrs if group != "/" else root
    layers = kv.layers
    if layers is None:
        n = a.get("num_layers")
        layers = _readonly(np.arange(int(n) if isinstance(n, int) else 0, dtype=np.int64))
    nq = a.get("num_q_heads")
    heads = _readonly(np.arange(int(nq) if isinstance(nq, int) else 0, dtype=np.int64))
    empty = _readonly(np.zeros(0, dtype=np.float64))
    budgets = Budgets(values=empty, kind="tokens", units="tokens", labels=(), long_name="(no budgets: KV report)")
    shape = {k: a[k] for k in ("model", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "v_head_dim",
                               "kv_lora_rank", "qk_rope_head_dim", "attention", "sliding_window", "chunk_size")
             if k in a}
    return Report(path=r.path, format_version=version, provenance=root, config={}, capture=shape, budgets=budgets,
                  layers=layers, heads=heads, query_positions=_readonly(np.zeros(0, dtype=np.int64)), selectors={},
                  reuse=None, kv=kv, kind="kv")


def _load_sweep(r: _Reader, root: Dict[str, Any], version: int) -> SweepReport:
    """A 'hysparse sweep' report, format_version 1."""
    f = r.f
    config = _config(r.group("/config"))
    sweep_g = r.group("/sweep")
    sa = _attrs(sweep_g)
    status = sa.get("status")
    if status not in ("complete", "partial"):
        raise r.fail(f"/sweep status is {status!r}", "status 'complete' or 'partial'")
    counts = {}
    for key in ("units_total", "units_done"):
        v = sa.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise r.fail(f"/sweep {key} is {v!r}", f"a non-negative integer {key}")
        counts[key] = int(v)
    if counts["units_done"] > counts["units_total"]:
        raise r.fail(f"/sweep units_done {counts['units_done']} > units_total {counts['units_total']}",
                     "units_done <= units_total")
    budget_kind = sa.get("budget_kind")
    if budget_kind not in ("tokens", "sparsity"):
        raise r.fail(f"/sweep budget_kind is {budget_kind!r}", "budget_kind 'tokens' or 'sparsity'")

    # Points: every column 1-D, all of one length.
    pg = r.group("/sweep/points")
    columns: Dict[str, Array] = {}
    wanted = dict(SWEEP_ID_COLUMNS, **{m: "f" for m in SWEEP_METRIC_COLUMNS})
    for name, kind in wanted.items():
        columns[name] = r.column(r.dataset(f"/sweep/points/{name}"), kind)
    for name in pg:  # columns a newer tool adds: numbers or strings, as they are
        obj = pg[name]
        if name in columns or not isinstance(obj, h5py.Dataset) or obj.ndim != 1:
            continue
        columns[name] = r.column(obj, "s" if obj.dtype.kind in "OSU" else ("i" if obj.dtype.kind in "iub" else "f"))
    n = columns["capture"].values.size
    for name, col in columns.items():
        if col.values.size != n:
            raise r.fail(f"/sweep/points/{name} has {col.values.size} rows but /sweep/points/capture has {n}",
                         "columns of one length")
    if n == 0 and status == "complete":
        raise r.fail("/sweep/points is empty", "at least one point in a complete sweep")
    if n and set(np.unique(columns["budget_kind"].values).tolist()) - {budget_kind}:
        raise r.fail(f"/sweep/points/budget_kind has {sorted(set(columns['budget_kind'].values.tolist()))}",
                     f"'{budget_kind}' as /sweep budget_kind")

    # Axes (dimension scales) and the grid.
    axes: Dict[str, Array] = {}
    for name in SWEEP_AXES:
        kind = "s" if name in ("selector", "schedule", "group") else ("f" if name == "budget" else "i")
        axes[name] = r.column(r.dataset(f"/sweep/axes/{name}"), kind)
    cap_ds = r.dataset("/sweep/axes/capture")
    labels = _attrs(cap_ds).get("labels")
    labels = [str(x) for x in (labels if isinstance(labels, list) else ([labels] if labels is not None else []))]
    C = axes["capture"].values.size - 1
    if C < 0:
        raise r.fail("/sweep/axes/capture is empty", "the capture indices and 'pooled'")
    if labels and len(labels) != C + 1:
        raise r.fail(f"/sweep/axes/capture has {C + 1} values but {len(labels)} labels", "one label per value")
    shape = tuple(axes[a].values.size for a in SWEEP_AXES)
    grid: Dict[str, Array] = {}
    gg = r.group("/sweep/grid", required=False)
    for name in (gg or {}):
        obj = gg[name]
        if not isinstance(obj, h5py.Dataset):
            continue
        arr = r.array(obj)
        if arr.shape != shape:
            raise r.fail(f"dataset '/sweep/grid/{name}' has shape {arr.shape}",
                         "[" + " x ".join(f"{a} {k}" for a, k in zip(SWEEP_AXES, shape)) + "]")
        if not arr.dims or arr.dims[0].startswith("dim"):
            arr = Array(arr.path, arr.values, SWEEP_AXES, arr.units, arr.long_name)
        grid[name] = arr

    # Work units.
    units: Dict[str, Array] = {}
    if r.group("/sweep/units", required=False) is not None:
        for name in SWEEP_UNIT_COLUMNS:
            ds = r.dataset(f"/sweep/units/{name}")
            units[name] = r.column(ds, "f" if name == "seconds" else "i")
        sizes = {a.values.size for a in units.values()}
        if len(sizes) > 1:
            raise r.fail(f"/sweep/units columns have lengths {sorted(sizes)}", "columns of one length")

    # Captures: each a replay report under /captures/<c>.
    cg = r.group("/captures")
    names = sorted((k for k in cg if isinstance(cg[k], h5py.Group)), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    if [k for k in names] != [str(i) for i in range(len(names))]:
        raise r.fail(f"/captures has groups {names}", "groups named 0, 1, ... (one per capture)")
    # A partial sweep has no group yet for the captures it has not started.
    if len(names) > C or (len(names) < C and status == "complete"):
        raise r.fail(f"/captures has {len(names)} groups but /sweep/axes/capture has {C} captures",
                     "one group per capture" + (" started" if status == "partial" else ""))
    captures: List[Optional[Report]] = []
    for c in names:
        g = cg[c]
        ga = _attrs(g)
        sub = _Reader(r.path, f, f"/captures/{c}", "sweep report")
        prov = dict(root)
        if "path" in ga:
            prov["input_files"] = [str(ga["path"])]
        if "sha256" in ga:
            prov["input_sha256"] = [str(ga["sha256"])]
        if "sha256_source" in ga:
            prov["input_sha256_source"] = [str(ga["sha256_source"])]
        cap_attrs = {k: v for k, v in ga.items() if k not in ("sha256", "sha256_source")}
        captures.append(_load_replay(sub, prov, version, config=config, capture=cap_attrs))
    captures += [None] * (C - len(captures))
    if not labels:
        labels = [str(c.capture.get("path", f"capture {i}")) if c is not None else f"capture {i}"
                  for i, c in enumerate(captures)] + ["pooled"]
    cap_col = columns["capture"].values
    bad = cap_col[(cap_col < -1) | (cap_col >= C)]
    if bad.size:
        raise r.fail(f"/sweep/points/capture has {int(bad[0])}", f"-1 (pooled) or 0 to {C - 1}")
    return SweepReport(path=r.path, format_version=version, provenance=root, config=config, status=str(status),
                       units_total=counts["units_total"], units_done=counts["units_done"],
                       budget_kind=str(budget_kind), points=SweepPoints(columns), axes=axes,
                       capture_labels=tuple(labels), grid=grid, units=units, captures=captures, sweep_attrs=sa)
