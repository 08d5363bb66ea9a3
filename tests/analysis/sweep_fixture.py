"""A sweep report (format "hysparse-sweep", version 1) assembled with h5py from real 'hysparse replay' reports.

Used by test_sweep.py where the tool has no 'hysparse sweep' (it came later), and for the cases the tool does
not produce on demand (a partial sweep). It follows the schema of the sweep issue exactly:

- root: format, format_version 1 and the replay reports' provenance attributes (input_files: every capture);
- /config attr json; /sweep attrs status, units_total, units_done, budget_kind;
- /sweep/points/<column>: one row per (capture or pooled (-1), selector instance, budget), model-level metrics
  from the replay reports' model_* datasets, kv_bytes from kv_resident_bytes; pooled rows the mean over captures
  (min for mass_recall_min);
- /sweep/axes/<name> dimension scales, /sweep/grid/<column> [capture, selector, block, window, sinks, schedule,
  group, budget] with repeats where an axis does not apply (schedule or group "") and NaN where nothing ran;
- /sweep/units/{capture, layer, done, seconds}; /captures/<c>/ the replay report of capture c (attrs path,
  sha256), hysparse instances of a second schedule merged in under their own labels.

Only the test needs this module; the analysis package never imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

AXES = ("capture", "selector", "block", "window", "sinks", "schedule", "group", "budget")
METRICS = ("sparsity", "mass_recall", "mass_recall_p10", "mass_recall_p50", "mass_recall_min",
           "mass_recall_sparse_layers", "recall_vs_oracle", "topk_overlap", "attended_keys", "budget_keys",
           "output_rel_error", "kv_bytes", "kv_full_bytes", "kv_ratio")
UNITS = {"capture": ("1", "capture index into /captures; -1: pooled over every capture"),
         "capture_path": ("", "capture file"), "selector": ("", "selector name"),
         "spec": ("", "resolved selector spec"), "label": ("", "selector group name under /captures/<c>/selectors"),
         "block": ("tokens", "block size"), "window": ("tokens", "forced window; -1: the window is the budget"),
         "sinks": ("tokens", "forced sink keys"), "schedule": ("", "layer schedule; empty where none"),
         "group": ("", "KV-group reduction; empty where none"), "budget": ("tokens", "budget"),
         "budget_kind": ("", "tokens or sparsity"),
         "sparsity": ("1", "realised sparsity: 1 - mean over scored rows of attended keys / causal keys"),
         "mass_recall": ("1", "mean mass recall over layers, heads and rows"),
         "mass_recall_p10": ("1", "10th percentile of per-row mass recall"),
         "mass_recall_p50": ("1", "median of per-row mass recall"),
         "mass_recall_min": ("1", "minimum of per-row mass recall"),
         "mass_recall_sparse_layers": ("1", "mean mass recall over the selector's sparse layers"),
         "recall_vs_oracle": ("1", "mass recall / per-head oracle recall"),
         "topk_overlap": ("1", "top-k overlap"), "attended_keys": ("keys", "mean attended keys"),
         "budget_keys": ("keys", "mean nominal budget in keys"),
         "output_rel_error": ("1", "mean relative output error (NaN without v)"),
         "kv_bytes": ("bytes", "resident KV bytes of the whole model at the capture's context (bf16, batch 1)"),
         "kv_full_bytes": ("bytes", "full-attention KV bytes, same model and context"),
         "kv_ratio": ("1", "kv_full_bytes / kv_bytes")}

# Selector specs replayed once per schedule; those without a schedule only with the first schedule.
DEFAULT_SELECTORS = ("oracle:block=32", "oracle", "swa", "swa:sinks=4", "quest", "hysparse:window=64",
                     "hysparse:window=128")


def _run(hysparse: str, args: Sequence[str]) -> None:
    proc = subprocess.run([hysparse] + [str(a) for a in args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"hysparse {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()}")


def _s(v) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _s(v[()])
    return str(v)


def _strings(values: Sequence[str]):
    return np.array(list(values), dtype=h5py.string_dtype())


def _fallback_kv(report_path: Path) -> Tuple[Dict[str, np.ndarray], float]:
    """kv_resident_bytes per label and kv_full_bytes: the report's own where it has them (newer tools), else the
    analysis package's fallback (this fixture stands in for the tool)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from analysis import load_report
    from analysis.kvbytes import selector_kv
    acc = selector_kv(load_report(report_path))
    return {l: np.asarray(sk.resident_bytes, dtype=np.float64) for l, sk in acc.selectors.items()}, acc.full_kv_bytes


def _attach_scales(g: h5py.Group, axes_group: h5py.Group) -> None:
    """Re-attach the dimension scales of a copied replay report (DIMENSION_LABELS name them)."""
    for name, ds in list(g.items()):
        if isinstance(ds, h5py.Group):
            _attach_scales(ds, axes_group)
            continue
        if "DIMENSION_LIST" in ds.attrs:
            del ds.attrs["DIMENSION_LIST"]
        if "REFERENCE_LIST" in ds.attrs:
            del ds.attrs["REFERENCE_LIST"]
        labels = ds.attrs.get("DIMENSION_LABELS")
        if labels is None or ds.attrs.get("CLASS") is not None:
            continue
        for i, lab in enumerate(np.atleast_1d(labels)):
            lab = _s(lab)
            if lab in axes_group and axes_group[lab].shape == (ds.shape[i],):
                ds.dims[i].attach_scale(axes_group[lab])


def write_sweep_fixture(hysparse: str, work: Path, out: Path, *, budget_kind: str = "tokens",
                        budgets: Sequence[str] = ("64", "128", "256"), schedules: Sequence[str] = ("FSSS", "1:2"),
                        selectors: Sequence[str] = DEFAULT_SELECTORS, partial: bool = False,
                        captures: Optional[List[Tuple[str, List[str]]]] = None) -> Path:
    """Write a sweep report at `out` from synth captures replayed by `hysparse`. Returns `out`."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shape = ["--layers", "6", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32"]
    if captures is None:
        captures = [("sweep_cap_a.h5", ["--seq-len", "384", "--seed", "7"]),
                    ("sweep_cap_b.h5", ["--seq-len", "512", "--seed", "3", "--no-v"])]
    cap_paths = []
    for name, extra in captures:
        p = work / name
        _run(hysparse, ["synth", "-o", p] + shape + extra)
        cap_paths.append(p)
    budget_flag = "--budget" if budget_kind == "tokens" else "--sparsity"
    replays: List[List[Tuple[str, Path]]] = []  # per capture: (schedule, report)
    for c, cap in enumerate(cap_paths):
        per = []
        for k, sched in enumerate(schedules):
            specs = list(selectors) if k == 0 else [s for s in selectors if s.startswith("hysparse")]
            rp = work / f"sweep_replay_{c}_{k}.h5"
            _run(hysparse, ["replay", cap, "-o", rp, budget_flag, ",".join(budgets), "--selectors", ",".join(specs),
                            "--schedule", sched, "--reuse-budget", "0", "--threads", "2", "-q"])
            per.append((sched, rp))
        replays.append(per)

    tmp = Path(str(out) + ".tmp")
    if tmp.exists():
        tmp.unlink()
    rows: List[Dict[str, object]] = []
    unit_rows: List[Tuple[int, int, int, float]] = []
    with h5py.File(tmp, "w") as dst:
        with h5py.File(replays[0][0][1], "r") as first:
            for k, v in first.attrs.items():
                if k not in ("format", "format_version", "replay_seconds", "score_elements"):
                    dst.attrs[k] = v
        dst.attrs["format"] = "hysparse-sweep"
        dst.attrs["format_version"] = np.int64(1)
        dst.attrs["command_line"] = (f"hysparse sweep {' '.join(str(p) for p in cap_paths)} {budget_flag} "
                                     f"{','.join(budgets)} --selectors {','.join(selectors)} "
                                     f"--schedule {','.join(schedules)} (h5py fixture)")
        shas, sources = [], []
        capg = dst.create_group("captures")
        for c, per in enumerate(replays):
            g = capg.create_group(str(c))
            sched0, rp0 = per[0]
            with h5py.File(rp0, "r") as src:
                shas.append(_s(src.attrs["input_sha256"][0]))
                sources.append(_s(src.attrs["input_sha256_source"][0]))
                for key in ("axes", "capture", "selectors", "kv", "config"):
                    if key in src:
                        src.copy(src[key], g, name=key)
                seconds = float(src.attrs.get("replay_seconds", 0.0))
            g.attrs["path"] = str(cap_paths[c])
            g.attrs["sha256"] = shas[-1]
            g.attrs["sha256_source"] = sources[-1]
            del g["config"]  # the sweep's /config holds the configuration
            order = [_s(x) for x in g["selectors"].attrs["order"]]
            schedule_of = {l: (sched0 if l.startswith("hysparse") else "") for l in order}
            for sched, rp in per[1:]:
                with h5py.File(rp, "r") as src:
                    for l in [_s(x) for x in src["selectors"].attrs["order"]]:
                        new = f"{l},schedule={sched}" if ":" in l else f"{l}:schedule={sched}"
                        src.copy(src["selectors"][l], g["selectors"], name=new)
                        g["selectors"][new].attrs["label"] = new
                        order.append(new)
                        schedule_of[new] = sched
                    seconds += float(src.attrs.get("replay_seconds", 0.0))
            g["selectors"].attrs["order"] = _strings(order)
            # kv_resident_bytes and kv_full_bytes, as the tool writes them.
            kvres: Dict[str, np.ndarray] = {}
            for sched, rp in per:
                prices, full = _fallback_kv(rp)
                with h5py.File(rp, "r") as src:
                    for l in [_s(x) for x in src["selectors"].attrs["order"]]:
                        lab = l if sched == sched0 else (f"{l},schedule={sched}" if ":" in l else f"{l}:schedule={sched}")
                        kvres[lab] = prices[l]
            for l in order:
                sg = g["selectors"][l]
                if "kv_resident_bytes" not in sg:
                    d = sg.create_dataset("kv_resident_bytes", data=kvres[l])
                    d.attrs["units"] = "bytes"
                    d.attrs["long_name"] = "resident KV bytes at the capture's context (bf16, batch 1, K/V + metadata)"
                    d.attrs["DIMENSION_LABELS"] = _strings(["budget"])
            g["selectors"].attrs["kv_full_bytes"] = float(full)
            _attach_scales(g["selectors"], g["axes"])
            if "kv" in g:
                _attach_scales(g["kv"], g["kv"])

            # Points of this capture.
            L = int(g["capture"].attrs["num_layers"])
            qpos = g["axes/query_position"][()]
            causal = float(np.mean(qpos + 1))
            budget_values = g["axes/budget"][()]
            done_layers = L if not (partial and c == len(replays) - 1) else L // 2
            for layer in range(L):
                unit_rows.append((c, layer, int(layer < done_layers), seconds / L if layer < done_layers else 0.0))
            for l in order:
                sg = g["selectors"][l]
                name = _s(sg.attrs["name"]) if "name" in sg.attrs else _s(sg.attrs["spec"]).split(":")[0]
                spec = _s(sg.attrs["spec"])
                params = dict(p.split("=", 1) for p in spec.partition(":")[2].split(",") if "=" in p)
                if partial and c == len(replays) - 1:  # unfinished layers: NaN, as the tool leaves them
                    for key, ds in sg.items():
                        if ds.ndim >= 2 and ds.shape[1] == L and ds.dtype.kind == "f":
                            v = ds[()]
                            v[:, done_layers:] = np.nan
                            ds[...] = v
                for bi, b in enumerate(budget_values):
                    def m(ds):
                        return float(sg[ds][bi]) if ds in sg else float("nan")
                    nan = float("nan")
                    incomplete = partial and c == len(replays) - 1
                    kvb = float(sg["kv_resident_bytes"][bi])
                    row = {"capture": c, "capture_path": str(cap_paths[c]), "selector": name, "spec": spec,
                           "label": l, "block": int(sg.attrs["block_size"]), "window": int(sg.attrs["window"]),
                           "sinks": int(sg.attrs["sinks"]), "schedule": schedule_of[l],
                           "group": params.get("group", ""), "budget": float(b), "budget_kind": budget_kind,
                           "sparsity": nan if incomplete else 1.0 - m("model_attended_keys_mean") / causal,
                           "mass_recall": nan if incomplete else m("model_mass_recall_mean"),
                           "mass_recall_p10": nan if incomplete else m("model_mass_recall_p10"),
                           "mass_recall_p50": nan if incomplete else m("model_mass_recall_p50"),
                           "mass_recall_min": nan if incomplete else m("model_mass_recall_min"),
                           "mass_recall_sparse_layers": nan if incomplete else m("model_mass_recall_mean_sparse_layers"),
                           "recall_vs_oracle": nan if incomplete else m("model_recall_vs_oracle_mean"),
                           "topk_overlap": nan if incomplete else m("model_topk_overlap_mean"),
                           "attended_keys": nan if incomplete else m("model_attended_keys_mean"),
                           "budget_keys": nan if incomplete else m("model_budget_keys_mean"),
                           "output_rel_error": nan if incomplete else m("model_output_rel_error_mean"),
                           "kv_bytes": kvb, "kv_full_bytes": float(full), "kv_ratio": float(full) / kvb}
                    rows.append(row)
        dst.attrs["input_files"] = _strings([str(p) for p in cap_paths])
        dst.attrs["input_sha256"] = _strings(shas)
        dst.attrs["input_sha256_source"] = _strings(sources)

        # Pooled rows: the mean over captures (min for the minimum), per instance and budget.
        C = len(replays)
        keyed: Dict[tuple, List[dict]] = {}
        for r in rows:
            keyed.setdefault((r["label"], r["budget"]), []).append(r)
        for (label, b), members in list(keyed.items()):
            base = dict(members[0])
            base.update(capture=-1, capture_path="pooled")
            for mcol in METRICS:
                vals = np.array([r[mcol] for r in members], dtype=np.float64)
                if partial:
                    vals = vals[np.isfinite(vals)] if np.isfinite(vals).any() else vals
                base[mcol] = float(np.min(vals)) if mcol == "mass_recall_min" else float(np.mean(vals))
            base["kv_ratio"] = float(np.mean([r["kv_ratio"] for r in members]))
            rows.append(base)

        config = {"captures": [str(p) for p in cap_paths], "budget_kind": budget_kind, "budgets": list(budgets),
                  "selectors": list(selectors), "schedules": list(schedules), "queries": "all", "threads": 2}
        dst.create_group("config").attrs["json"] = json.dumps(config)
        sw = dst.create_group("sweep")
        sw.attrs["status"] = "partial" if partial else "complete"
        sw.attrs["units_total"] = np.int64(len(unit_rows))
        sw.attrs["units_done"] = np.int64(sum(u[2] for u in unit_rows))
        sw.attrs["budget_kind"] = budget_kind
        pts = sw.create_group("points")
        columns = ["capture", "capture_path", "selector", "spec", "label", "block", "window", "sinks", "schedule",
                   "group", "budget", "budget_kind"] + list(METRICS)
        for col in columns:
            vals = [r[col] for r in rows]
            if isinstance(vals[0], str):
                data = _strings(vals)
            elif col in ("capture", "block", "window", "sinks"):
                data = np.array(vals, dtype=np.int64)
            else:
                data = np.array(vals, dtype=np.float64)
            d = pts.create_dataset(col, data=data)
            units, long_name = UNITS[col]
            if col == "budget" and budget_kind == "sparsity":
                units = "1"
            d.attrs["units"] = units
            d.attrs["long_name"] = long_name
            d.dims[0].label = "point"

        # Axes and grid.
        ax = sw.create_group("axes")
        values = {
            "capture": np.arange(C + 1, dtype=np.int64),
            "selector": sorted({r["selector"] for r in rows}),
            "block": np.array(sorted({r["block"] for r in rows}), dtype=np.int64),
            "window": np.array(sorted({r["window"] for r in rows}), dtype=np.int64),
            "sinks": np.array(sorted({r["sinks"] for r in rows}), dtype=np.int64),
            "schedule": sorted({r["schedule"] for r in rows}),
            "group": sorted({r["group"] for r in rows}),
            "budget": np.array(sorted({r["budget"] for r in rows}), dtype=np.float64),
        }
        for name in AXES:
            v = values[name]
            d = ax.create_dataset(name, data=_strings(v) if isinstance(v, list) else v)
            d.make_scale(name)
            d.attrs["units"] = {"block": "tokens", "window": "tokens", "sinks": "tokens",
                                "budget": "tokens" if budget_kind == "tokens" else "1"}.get(name, "1")
            d.attrs["long_name"] = UNITS.get(name, ("", name))[1]
        ax["capture"].attrs["labels"] = _strings([str(p) for p in cap_paths] + ["pooled"])
        ax["budget"].attrs["kind"] = budget_kind
        index = {name: {(x.item() if hasattr(x, "item") else x): i for i, x in enumerate(values[name])}
                 for name in AXES if name != "capture"}
        shape = tuple(len(values[a]) for a in AXES)
        grid = sw.create_group("grid")
        for mcol in METRICS:
            cube = np.full(shape, np.nan)
            for r in rows:
                c = r["capture"] if r["capture"] >= 0 else C
                sel = [c, index["selector"][r["selector"]], index["block"][r["block"]], index["window"][r["window"]],
                       index["sinks"][r["sinks"]],
                       slice(None) if r["schedule"] == "" else index["schedule"][r["schedule"]],
                       slice(None) if r["group"] == "" else index["group"][r["group"]],
                       index["budget"][r["budget"]]]
                cube[tuple(sel)] = r[mcol]
            d = grid.create_dataset(mcol, data=cube)
            d.attrs["units"], d.attrs["long_name"] = UNITS[mcol]
            for i, a in enumerate(AXES):
                d.dims[i].attach_scale(ax[a])
                d.dims[i].label = a
            d.attrs["DIMENSION_LABELS"] = _strings(AXES)
        un = sw.create_group("units")
        for i, (col, dt) in enumerate((("capture", np.int64), ("layer", np.int64), ("done", np.int64),
                                       ("seconds", np.float64))):
            d = un.create_dataset(col, data=np.array([u[i] for u in unit_rows], dtype=dt))
            d.attrs["units"] = "s" if col == "seconds" else "1"
            d.attrs["long_name"] = col
    os.replace(tmp, out)
    return Path(out)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hysparse", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("-o", required=True)
    ap.add_argument("--sparsity", action="store_true")
    ap.add_argument("--partial", action="store_true")
    a = ap.parse_args()
    kw = {"budget_kind": "sparsity", "budgets": ("0.5", "0.75", "0.9")} if a.sparsity else {}
    print(write_sweep_fixture(a.hysparse, Path(a.work), Path(a.o), partial=a.partial, **kw))
