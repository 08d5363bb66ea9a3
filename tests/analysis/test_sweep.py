#!/usr/bin/env python3
"""Tests of the analysis package on sweep reports (format hysparse-sweep, version 1).

Run from the repository root:

    /usr/bin/python3 tests/analysis/test_sweep.py --hysparse build/src/cli/hysparse --workdir /tmp/sweep-tests

The sweep reports come from the tool: 'hysparse synth' captures, then 'hysparse sweep' where the binary has
that command; where it does not, and for the cases the tool does not make on demand (a partial sweep, a
selector with more instances than line styles), sweep_fixture.py assembles the report with h5py from real
'hysparse replay' reports, following the schema. Every sweep figure is rendered; the tests check that the
numbers the loader hands the plots are the datasets read here directly with h5py, that the files are valid
PNG/PDF of paper size with provenance, that summary.md holds the key tables (recomputed here from h5py), and
that bad sweep files give one-line errors and exit code 2. Last line: "N passed, M failed".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from test_analysis import (PAPER_WIDTHS_PX, REPO, assert_same, h5_attr, h5_strings, png_info,  # noqa: E402
                           run_cli, summary_bytes)
from sweep_fixture import write_sweep_fixture  # noqa: E402

from analysis import ReportError, SweepReport, load_report, load_sweep  # noqa: E402
from analysis import figures as figs  # noqa: E402
from analysis import sweep_figures as sf  # noqa: E402
from analysis.summary import sweep_best_table  # noqa: E402

SWEEP_FIGURE_NAMES = list(sf.SWEEP_FIGURES)
REALISED = "sweep_recall_vs_realised_sparsity"   # sparsity budgets only
TOKEN_SWEEP_FIGURES = [n for n in SWEEP_FIGURE_NAMES if n != REALISED]
# hysparse selectors: 4 instances per schedule, 8 in all: more than the line styles, so its panel splits.
MANY_SELECTORS = ("oracle:block=32", "oracle", "swa", "swa:sinks=4", "quest", "hysparse:window=64",
                  "hysparse:window=128", "hysparse:block=32,window=64", "hysparse:block=32,window=128")


SHAPE = ["--layers", "6", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32"]


class Fixtures:
    hysparse: str = ""
    work: Path = Path(".")
    real: bool = False          # whether the sweeps came from 'hysparse sweep'
    tokens: Path = Path(".")    # token budgets, 2 captures (one without v), blocks x sinks x 2 schedules
    sparsity: Path = Path(".")  # sparsity budgets, 1 capture
    partial: Path = Path(".")   # h5py fixture, status partial: the second capture's second half of layers not done
    unstarted: Optional[Path] = None  # the real sweep as a partial one that has not started its second capture
    many: Path = Path(".")      # 8 hysparse instances: the recall figure splits its panel

    @classmethod
    def build(cls, hysparse: str, workdir: str) -> None:
        cls.hysparse = str(Path(hysparse).resolve())
        os.makedirs(workdir, exist_ok=True)
        cls.work = Path(tempfile.mkdtemp(prefix="sweep-", dir=workdir))
        cls.tokens = cls.work / "sweep.h5"
        cls.sparsity = cls.work / "sweep_sparsity.h5"
        cls.real = cls.has_sweep_command()
        if cls.real:
            a, b, c = cls.work / "cap_a.h5", cls.work / "cap_b.h5", cls.work / "cap_c.h5"
            cls.run_tool(["synth", "-o", a, "--seq-len", "384", "--seed", "7"] + SHAPE)
            cls.run_tool(["synth", "-o", b, "--seq-len", "512", "--seed", "3", "--no-v"] + SHAPE)
            cls.run_tool(["synth", "-o", c, "--seq-len", "512", "--seed", "5"] + SHAPE)
            cls.run_tool(["sweep", a, b, "-o", cls.tokens, "--budget", "64,128,256", "--selectors",
                          "oracle,swa,quest,hysparse", "--block", "32,64", "--sinks", "0,4", "--schedule", "FSSS",
                          "--schedule", "1:2", "--threads", "2", "-q"])
            cls.run_tool(["sweep", c, "-o", cls.sparsity, "--sparsity", "0.5,0.75,0.9", "--selectors",
                          "oracle,swa,hysparse", "--schedule", "1:2", "--threads", "2", "-q"])
            cls.many = cls.tokens  # hysparse: 2 blocks x 2 sinks x 2 schedules
            cls.unstarted = make_unstarted(cls.tokens, cls.work / "sweep_unstarted.h5")
        else:
            write_sweep_fixture(cls.hysparse, cls.work / "fx_tokens", cls.tokens)
            write_sweep_fixture(cls.hysparse, cls.work / "fx_sparsity", cls.sparsity, budget_kind="sparsity",
                                budgets=("0.5", "0.75", "0.9"), schedules=("1:2",),
                                selectors=("oracle", "swa", "hysparse"),
                                captures=[("sp_cap.h5", ["--seq-len", "512", "--seed", "5"])])
            cls.many = write_sweep_fixture(
                cls.hysparse, cls.work / "fx_many", cls.work / "sweep_many.h5", selectors=MANY_SELECTORS,
                captures=[("many_cap.h5", ["--seq-len", "384", "--seed", "9"])])
        # A sweep stopped halfway through its last capture (the tool leaves unfinished layers NaN).
        cls.partial = write_sweep_fixture(
            cls.hysparse, cls.work / "fx_partial", cls.work / "sweep_partial.h5", schedules=("FSSS",),
            selectors=("oracle", "swa", "hysparse"), partial=True)

    @classmethod
    def has_sweep_command(cls) -> bool:
        probe = subprocess.run([cls.hysparse, "--help"], capture_output=True, text=True, timeout=30)
        return bool(re.search(r"^\s+sweep\s", probe.stdout, re.M))  # CLI11 answers 'X --help' for any X

    @classmethod
    def run_tool(cls, args) -> None:
        proc = subprocess.run([cls.hysparse] + [str(a) for a in args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"hysparse {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()}")

    @staticmethod
    def all():
        paths = [Fixtures.tokens, Fixtures.sparsity, Fixtures.partial, Fixtures.many, Fixtures.unstarted]
        return [p for i, p in enumerate(paths) if p is not None and p not in paths[:i]]


def make_unstarted(src: Path, dst: Path) -> Path:
    """The real two-capture sweep as 'hysparse sweep' writes it while the second capture has not started:
    status partial, the second capture's units not done, no /captures/1, no rows of capture 1, its grid
    cells NaN. (Pooled rows are left as they are: only the loader's handling of the missing capture is at
    stake here.)"""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        sw = f["sweep"]
        done = sw["units/done"][()]
        done[sw["units/capture"][()] == 1] = 0
        sw["units/done"][...] = done
        sw.attrs["status"] = "partial"
        sw.attrs["units_done"] = np.int64(done.sum())
        del f["captures/1"]
        keep = sw["points/capture"][()] != 1
        for k in list(sw["points"]):
            ds = sw["points"][k]
            data, attrs = ds[()][keep], dict(ds.attrs)
            del sw["points"][k]
            new = sw["points"].create_dataset(k, data=data)
            for a, v in attrs.items():
                if a not in ("DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME"):
                    new.attrs[a] = v
        for k in sw["grid"]:
            g = sw["grid"][k]
            v = g[()]
            v[1] = np.nan
            g[...] = v
    return dst


def h5_rows(f, where=None):
    """The /sweep/points table read with h5py: dict of numpy arrays (strings decoded)."""
    g = f["sweep/points"]
    out = {}
    for k in g:
        v = g[k][()]
        out[k] = np.array(h5_strings(g[k]), dtype=str) if g[k].dtype.kind in "OSU" else v
    return out


def pooled_mask(t, num_captures):
    m = t["capture"] == -1
    if not m.any() and num_captures == 1:
        m = t["capture"] == 0
    return m


def instance_key(t, i):
    return tuple(str(t[k][i]) for k in ("selector", "spec", "block", "window", "sinks", "schedule", "group"))


class SweepLoaderTest(unittest.TestCase):
    """load_report hands out exactly what the sweep files hold."""

    def check(self, path: Path) -> None:
        rep = load_report(path)
        self.assertIsInstance(rep, SweepReport)
        self.assertEqual(rep.kind, "sweep")
        with h5py.File(path, "r") as f:
            self.assertEqual(h5_attr(f, "format"), "hysparse-sweep")
            for key in ("format", "format_version", "tool_version", "git_sha", "command_line", "created_utc",
                        "backend", "device", "seed", "threads", "input_files", "input_sha256",
                        "input_sha256_source"):
                self.assertEqual(rep.provenance[key], h5_attr(f, key), key)
            self.assertEqual(rep.config, json.loads(h5_attr(f["config"], "json")))
            sw = f["sweep"]
            self.assertEqual((rep.status, rep.units_total, rep.units_done, rep.budget_kind),
                             (h5_attr(sw, "status"), h5_attr(sw, "units_total"), h5_attr(sw, "units_done"),
                              h5_attr(sw, "budget_kind")))
            self.assertEqual(rep.is_partial, h5_attr(sw, "status") == "partial")
            # Every column of the points table, with its units and long name.
            g = sw["points"]
            self.assertEqual(set(rep.points.names), set(g))
            n = g["capture"].shape[0]
            self.assertEqual(len(rep.points), n)
            for k in g:
                ds = g[k]
                col = rep.points.column(k)
                if ds.dtype.kind in "OSU":
                    self.assertEqual(rep.points[k].tolist(), h5_strings(ds), k)
                else:
                    assert_same(self, rep.points[k], ds[()], k)
                self.assertEqual(col.units, h5_attr(ds, "units"), k)
                self.assertEqual(col.long_name, h5_attr(ds, "long_name"), k)
                self.assertFalse(rep.points[k].flags.writeable, k)
            for k in ("sparsity", "mass_recall", "mass_recall_p10", "mass_recall_p50", "kv_bytes", "kv_full_bytes",
                      "kv_ratio", "output_rel_error"):
                self.assertEqual(rep.points[k].dtype, np.float64, k)
            for k in ("capture", "block", "window", "sinks"):
                self.assertEqual(rep.points[k].dtype, np.int64, k)
            # Axes, grid, units.
            for k in ("capture", "selector", "block", "window", "sinks", "schedule", "group", "budget"):
                ds = sw["axes"][k]
                if ds.dtype.kind in "OSU":
                    self.assertEqual(rep.axes[k].values.tolist(), h5_strings(ds), k)
                else:
                    assert_same(self, rep.axes[k].values, ds[()], k)
            self.assertEqual(list(rep.capture_labels), h5_attr(sw["axes/capture"], "labels"))
            self.assertEqual(set(rep.grid), set(sw["grid"]))
            for k in sw["grid"]:
                assert_same(self, rep.grid[k].values, sw["grid"][k][()], f"grid/{k}")
                self.assertEqual(rep.grid[k].dims, ("capture", "selector", "block", "window", "sinks", "schedule",
                                                    "group", "budget"))
            for k in sw["units"]:
                assert_same(self, rep.units[k].values, sw["units"][k][()], f"units/{k}")
            # Captures: each a replay report under /captures/<c> (None: not started yet).
            self.assertEqual(rep.num_captures, sw["axes/capture"].shape[0] - 1)
            for c, cap in enumerate(rep.captures):
                if str(c) not in f["captures"]:
                    self.assertIsNone(cap)
                    self.assertTrue(rep.is_partial)
                    continue
                g = f["captures"][str(c)]
                self.assertEqual(cap.group, f"/captures/{c}")
                self.assertEqual(cap.input_files, [h5_attr(g, "path")])
                self.assertEqual(cap.provenance["input_sha256"], [h5_attr(g, "sha256")])
                self.assertEqual(cap.provenance["input_sha256_source"], [h5_attr(g, "sha256_source")])
                self.assertIn(h5_attr(g, "sha256_source"), ("computed", "cache"))
                self.assertEqual(list(cap.selector_order), h5_attr(g["selectors"], "order"))
                assert_same(self, cap.budgets.values, g["axes/budget"][()], "capture budgets")
                self.assertEqual(cap.kv_full_bytes, h5_attr(g["selectors"], "kv_full_bytes"))
                for label in cap.selector_order:
                    s = cap.selector(label)
                    for name, ds in g["selectors"][label].items():
                        assert_same(self, s[name], ds[()], f"/captures/{c}/selectors/{label}/{name}")

    def test_tokens(self):
        self.check(Fixtures.tokens)

    def test_sparsity(self):
        self.check(Fixtures.sparsity)
        rep = load_report(Fixtures.sparsity)
        self.assertEqual(rep.budget_kind, "sparsity")
        self.assertEqual(rep.num_captures, 1)

    def test_partial(self):
        self.check(Fixtures.partial)
        rep = load_report(Fixtures.partial)
        self.assertTrue(rep.is_partial)
        self.assertLess(rep.units_done, rep.units_total)
        self.assertIn("PARTIAL", rep.provenance_line())

    def test_many(self):
        self.check(Fixtures.many)

    def test_unstarted_capture(self):
        """A partial sweep that has not started a capture: no /captures/<c> group for it, no rows."""
        if Fixtures.unstarted is None:
            self.assertFalse(Fixtures.real)  # only made from a real sweep
            return
        self.check(Fixtures.unstarted)
        rep = load_report(Fixtures.unstarted)
        self.assertIsNone(rep.captures[1])
        self.assertEqual(rep.num_captures, 2)
        self.assertEqual(rep.capture_rows(1).size, 0)

    def test_instances_and_pooled_rows(self):
        """Instances: one per distinct (selector, spec, parameters, schedule), rows sorted by budget."""
        for path in Fixtures.all():
            rep = load_report(path)
            with h5py.File(path, "r") as f:
                t = h5_rows(f)
                C = len(f["captures"])
            pooled = np.flatnonzero(pooled_mask(t, C))
            assert_same(self, rep.pooled_rows(), pooled, "pooled rows")
            found = rep.points.instances(rep.pooled_rows())
            keys = {instance_key(t, i) for i in pooled}
            self.assertEqual(len(found), len(keys))
            for inst, rows in found:
                self.assertEqual({instance_key(t, i) for i in rows}, {instance_key(t, rows[0])})
                self.assertEqual(tuple(str(x) for x in inst.key), instance_key(t, rows[0]))
                self.assertEqual(sorted(t["budget"][rows].tolist()), t["budget"][rows].tolist())
                self.assertEqual(inst.spec, t["spec"][rows[0]])
                self.assertEqual(inst.label, t["label"][rows[0]])

    def test_points_agree_with_captures(self):
        """The tool's points table agrees with its own /captures/<c> replay content and the grid."""
        for path in Fixtures.all():
            with h5py.File(path, "r") as f:
                t = h5_rows(f)
                C = f["sweep/axes/capture"].shape[0] - 1
                partial = h5_attr(f["sweep"], "status") == "partial"
                # The grid holds the points' values (repeated where an axis does not apply), nothing else.
                for k in f["sweep/grid"]:
                    grid = f["sweep/grid"][k][()]
                    self.assertEqual(grid.ndim, 8, k)
                    for c in range(C + 1):
                        cells = grid[c][np.isfinite(grid[c])]
                        mine = t[k][t["capture"] == (c if c < C else -1)]
                        self.assertEqual(set(cells.tolist()), set(mine[np.isfinite(mine)].tolist()), f"grid {k} [{c}]")
                for i in range(t["capture"].size):
                    c = int(t["capture"][i])
                    if c < 0:
                        continue
                    g = f["captures"][str(c)]["selectors"][t["label"][i]]
                    bi = list(f["captures"][str(c)]["axes/budget"][()]).index(t["budget"][i])
                    self.assertEqual(t["kv_bytes"][i], g["kv_resident_bytes"][bi])
                    self.assertEqual(t["kv_full_bytes"][i],
                                     h5_attr(f["captures"][str(c)]["selectors"], "kv_full_bytes"))
                    self.assertAlmostEqual(t["kv_ratio"][i], t["kv_full_bytes"][i] / t["kv_bytes"][i], places=12)
                    if not (partial and not np.isfinite(t["mass_recall"][i])):
                        for col, ds in (("mass_recall", "model_mass_recall_mean"), ("mass_recall_p10",
                                        "model_mass_recall_p10"), ("mass_recall_p50", "model_mass_recall_p50"),
                                        ("attended_keys", "model_attended_keys_mean")):
                            self.assertAlmostEqual(t[col][i], g[ds][bi], delta=1e-12 * max(1.0, abs(g[ds][bi])),
                                                   msg=f"row {i} {col}")
                # Pooled KV bytes: the mean over captures.
                if path == Fixtures.unstarted:
                    continue
                for i in np.flatnonzero(t["capture"] == -1):
                    same = (t["spec"] == t["spec"][i]) & (t["schedule"] == t["schedule"][i]) & \
                        (t["budget"] == t["budget"][i]) & (t["capture"] >= 0)
                    self.assertEqual(int(same.sum()), C, f"row {i}")
                    self.assertAlmostEqual(t["kv_bytes"][i], float(np.mean(t["kv_bytes"][same])), places=6)


class SweepFigureDataTest(unittest.TestCase):
    """What the sweep figures draw is what the file holds (read here with h5py)."""

    @staticmethod
    def lines(fig):
        return {l.get_gid(): l for ax in fig.axes for l in ax.get_lines() if l.get_gid()}

    def check_recall_vs_sparsity(self, path: Path):
        rep = load_report(path)
        r = sf.build_sweep(rep, "sweep_recall_vs_sparsity")
        lines = self.lines(r.figure)
        with h5py.File(path, "r") as f:
            t = h5_rows(f)
            C = len(f["captures"])
            kind = h5_attr(f["sweep"], "budget_kind")
        pooled = pooled_mask(t, C)
        xcol = "budget" if kind == "sparsity" else "sparsity"
        self.assertEqual(r.data["x_column"], xcol)
        keys = {instance_key(t, i) for i in np.flatnonzero(pooled)}
        self.assertEqual(len(r.data["instances"]), len(keys))
        labels = list(r.data["instances"])
        self.assertEqual(len(set(labels)), len(labels), "legend texts are unique")
        for label, d in r.data["instances"].items():
            rows = d["rows"]
            key = instance_key(t, rows[0])
            mine = np.flatnonzero(pooled & np.array([instance_key(t, i) == key for i in range(t["capture"].size)]))
            self.assertEqual(sorted(rows.tolist()), sorted(mine.tolist()), label)
            order = np.argsort(t[xcol][mine], kind="stable")
            mine = mine[order]
            assert_same(self, d["x"], t[xcol][mine], f"{label} x")
            assert_same(self, d["mean"], t["mass_recall"][mine], f"{label} mean")
            assert_same(self, d["p10"], t["mass_recall_p10"][mine], f"{label} p10")
            assert_same(self, d["p50"], t["mass_recall_p50"][mine], f"{label} p50")
            ok = np.isfinite(t[xcol][mine]) & np.isfinite(t["mass_recall"][mine])
            if ok.any():
                assert_same(self, lines[f"mean:{label}"].get_xdata(), t[xcol][mine][ok], f"{label} line x")
                assert_same(self, lines[f"mean:{label}"].get_ydata(), t["mass_recall"][mine][ok], f"{label} line y")
                band = [c for ax in r.figure.axes for c in ax.collections if c.get_gid() == f"band:{label}"][0]
                ys = band.get_paths()[0].vertices[:, 1]
                self.assertAlmostEqual(float(ys.min()), float(np.nanmin(t["mass_recall_p10"][mine][ok])), places=12)
                self.assertAlmostEqual(float(ys.max()), float(np.nanmax(t["mass_recall_p50"][mine][ok])), places=12)
            self.assertTrue(label.startswith(t["selector"][mine[0]]), label)
        self.assertIn("10th to 50th percentile", r.caption)
        self.assertIn("not p90", r.caption)
        return rep, r

    def test_recall_vs_sparsity_tokens(self):
        rep, r = self.check_recall_vs_sparsity(Fixtures.tokens)
        labels = list(r.data["instances"])
        # The legend names what differs between the instances of one selector.
        with h5py.File(Fixtures.tokens, "r") as f:
            t = h5_rows(f)
        for sel in set(t["selector"].tolist()):
            mine = [l for l in labels if l.split(" ")[0] == sel]
            if len(mine) > 1:
                self.assertTrue(all("=" in l for l in mine), mine)
        self.assertIn("realised sparsity", r.data["xlabel"])
        self.assertIn(r.data["xlabel"], [ax.get_xlabel() for ax in r.figure.axes])

    def test_recall_vs_sparsity_sparsity_budgets(self):
        rep, r = self.check_recall_vs_sparsity(Fixtures.sparsity)
        self.assertEqual(r.data["x_column"], "budget")
        self.assertIn("requested", r.caption)
        # The caption warns where the realised sparsity falls short of the requested one (computed here).
        with h5py.File(Fixtures.sparsity, "r") as f:
            t = h5_rows(f)
        gap = np.nanmax(t["budget"] - t["sparsity"])
        self.assertEqual("Caution:" in r.caption, bool(gap > 0.02), r.caption)
        # The companion figure: the same lines against the realised sparsity.
        c = sf.build_sweep(rep, REALISED)
        self.assertEqual(c.data["x_column"], "sparsity")
        lines = self.lines(c.figure)
        for label, d in c.data["instances"].items():
            rows = d["rows"]
            self.assertEqual(sorted(rows.tolist()), sorted(r.data["instances"][label]["rows"].tolist()))
            assert_same(self, d["x"], t["sparsity"][rows], label)
            ok = np.isfinite(t["sparsity"][rows]) & np.isfinite(t["mass_recall"][rows])
            assert_same(self, lines[f"mean:{label}"].get_xdata(), t["sparsity"][rows][ok], label)
            assert_same(self, lines[f"mean:{label}"].get_ydata(), t["mass_recall"][rows][ok], label)
        self.assertIsNone(sf.build_sweep(load_report(Fixtures.tokens), REALISED))

    def test_recall_vs_sparsity_panels(self):
        """More instances of a selector than line styles: its panel splits by a parameter; the others' means
        appear in grey in every panel."""
        rep, r = self.check_recall_vs_sparsity(Fixtures.many)
        split = [p for p in r.data["panels"] if p["where"]]
        self.assertGreaterEqual(len(split), 2, r.data["panels"])
        for p in split:
            self.assertLessEqual(len(p["labels"]), sf.MAX_LINES_PER_PANEL)
            for axis, value in p["where"].items():
                self.assertIn(f"{axis}={value}", p["title"])
                for label in p["labels"]:
                    self.assertIn(f"{axis}={value}", label)
        contexts = [l for ax in r.figure.axes for l in ax.get_lines() if (l.get_gid() or "").startswith("context:")]
        self.assertTrue(contexts)
        self.assertTrue(all(l.get_color() == sf.CONTEXT_COLOUR for l in contexts))
        self.assertIn("One panel per selector", r.caption)

    def test_partial_marked(self):
        rep, r = self.check_recall_vs_sparsity(Fixtures.partial)
        texts = [t.get_text() for t in r.figure.texts if t.get_gid() == "partial"]
        self.assertEqual(len(texts), 1)
        self.assertIn(f"{rep.units_done} of {rep.units_total}", texts[0])
        self.assertIn("PARTIAL SWEEP", r.caption)

    def test_pareto(self):
        for path in Fixtures.all():
            rep = load_report(path)
            r = sf.build_sweep(rep, "sweep_pareto")
            lines = self.lines(r.figure)
            with h5py.File(path, "r") as f:
                t = h5_rows(f)
                C = len(f["captures"])
            pooled = np.flatnonzero(pooled_mask(t, C))
            for label, d in r.data["instances"].items():
                rows = d["rows"]
                assert_same(self, d["kv_bytes"], t["kv_bytes"][rows], label)
                assert_same(self, d["mass_recall"], t["mass_recall"][rows], label)
                ok = np.isfinite(t["kv_bytes"][rows]) & np.isfinite(t["mass_recall"][rows])
                assert_same(self, lines[f"kv:{label}"].get_xdata(), t["kv_bytes"][rows][ok], f"{label} x")
                assert_same(self, lines[f"kv:{label}"].get_ydata(), t["mass_recall"][rows][ok], f"{label} y")
            # Frontier by brute force over the pooled points (ties: one of the equal points).
            pts = [(i, t["kv_bytes"][i], t["mass_recall"][i]) for i in pooled
                   if np.isfinite(t["kv_bytes"][i]) and np.isfinite(t["mass_recall"][i])]
            expected = {(x, y) for i, x, y in pts
                        if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for _, x2, y2 in pts)}
            got = [(t["kv_bytes"][i], t["mass_recall"][i]) for i in r.data["frontier_rows"]]
            self.assertEqual(set(got), expected, path.name)
            self.assertEqual(len(got), len(expected))
            fp = lines["frontier-points"]
            assert_same(self, fp.get_xdata(), t["kv_bytes"][r.data["frontier_rows"]], "frontier x")
            assert_same(self, fp.get_ydata(), t["mass_recall"][r.data["frontier_rows"]], "frontier y")
            self.assertEqual(float(lines["full-kv"].get_xdata()[0]), float(np.median(t["kv_full_bytes"][pooled])))
            self.assertEqual(r.figure.axes[0].get_xscale(), "log")
            self.assertIn("bytes", r.figure.axes[0].get_xlabel())
            # Frontier labels never overlap one another.
            texts = [x for x in r.figure.axes[0].texts if (x.get_gid() or "").startswith("frontier-label:")]
            r.figure.canvas.draw()
            boxes = [x.get_window_extent() for x in texts]
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    self.assertFalse(boxes[a].overlaps(boxes[b]), (texts[a].get_text(), texts[b].get_text()))

    def test_per_capture(self):
        rep = load_report(Fixtures.tokens)
        r = sf.build_sweep(rep, "sweep_per_capture")
        lines = self.lines(r.figure)
        with h5py.File(Fixtures.tokens, "r") as f:
            t = h5_rows(f)
            C = len(f["captures"])
        budgets = r.data["budgets"]
        for label, per_budget in r.data["instances"].items():
            for j, b in enumerate(budgets):
                d = per_budget[b]
                for c in range(C + 1):
                    i = int(d["rows"][c])
                    if i < 0:
                        continue
                    self.assertEqual(int(t["capture"][i]), c if c < C else -1)
                    self.assertEqual(float(t["budget"][i]), b)
                    self.assertEqual(d["mass_recall"][c], t["mass_recall"][i])
                assert_same(self, lines[f"cap:{j}:{label}"].get_ydata(), d["mass_recall"][:C], label)
                assert_same(self, lines[f"pooled:{j}:{label}"].get_ydata(), d["mass_recall"][C:], label)
        self.assertIsNone(sf.build_sweep(load_report(Fixtures.sparsity), "sweep_per_capture"))

    def test_style(self):
        """Paper widths, text of at least 8 pt, the fixed selector colours."""
        for path in (Fixtures.tokens, Fixtures.sparsity, Fixtures.partial):
            rep = load_report(path)
            for name in SWEEP_FIGURE_NAMES:
                r = sf.build_sweep(rep, name)
                if r is None:
                    continue
                w, h = r.figure.get_size_inches()
                self.assertIn(round(w, 2), (figs.SINGLE_COLUMN_IN, figs.DOUBLE_COLUMN_IN), name)
                self.assertLessEqual(h, 8.0, name)
                for txt in r.figure.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
                    if txt.get_text().strip() and txt.get_visible():
                        self.assertGreaterEqual(txt.get_fontsize(), 8.0, f"{name}: {txt.get_text()!r}")
                footer = [x for x in r.figure.texts if x.get_gid() == "footer"]
                self.assertEqual(len(footer), 1)
                self.assertIn(rep.provenance["git_sha"][:12], footer[0].get_text())
        # Every instance in its selector's colour family, the same in every figure; the first instance of a
        # selector in the selector's fixed colour (oracle black, hysparse vermillion, swa blue).
        rep = load_report(Fixtures.tokens)
        styles = {ln.label: ln.style for ln in sf.sweep_lines(rep)}
        fixed = {"oracle": "#000000", "hysparse": "#D55E00", "swa": "#0072B2"}
        firsts = {}
        for ln in sf.sweep_lines(rep):
            firsts.setdefault(ln.instance.selector, ln.style["color"])
            self.assertEqual(ln.style["color"], figs.selector_style(ln.instance.selector,
                                                                    _variant_of(ln.style, ln.instance.selector))["color"])
        for sel, colour in fixed.items():
            self.assertEqual(firsts[sel], colour, sel)
        for name, prefix in (("sweep_pareto", "kv:"), ("sweep_recall_vs_sparsity", "mean:")):
            lines = self.lines(sf.build_sweep(rep, name).figure)
            for label, st in styles.items():
                self.assertEqual(lines[prefix + label].get_color(), st["color"], f"{name} {label}")
        pc = self.lines(sf.build_sweep(rep, "sweep_per_capture").figure)
        for label, st in styles.items():
            self.assertEqual(pc[f"cap:0:{label}"].get_color(), st["color"], label)


def _variant_of(style, family):
    """The variant index of `figures.selector_style` that gives this colour and dashes."""
    for k in range(len(figs._VARIANTS)):
        st = figs.selector_style(family, k)
        if st["color"] == style["color"] and str(st["linestyle"]) == str(style["linestyle"]):
            return k
    raise AssertionError(f"{family}: style {style} is none of the selector's variants")


class SweepCliTest(unittest.TestCase):
    """python3 -m analysis SWEEP.h5 --out DIR: figures, summary.md, exit codes."""

    def run_ok(self, path: Path, out: Path, *extra):
        proc = run_cli(path, "--out", out, *extra)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc

    def check_files(self, path: Path, out: Path, names, skipped=()):
        self.assertFalse([p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left")
        with h5py.File(path, "r") as f:
            sha, created = h5_attr(f, "git_sha"), h5_attr(f, "created_utc")
        for name in names:
            png, pdf = out / f"{name}.png", out / f"{name}.pdf"
            self.assertTrue(png.is_file() and pdf.is_file(), name)
            w, h, text = png_info(png)
            self.assertIn(w, PAPER_WIDTHS_PX, f"{name}.png width {w}")
            self.assertTrue(600 <= h <= 2400, f"{name}.png height {h}")
            self.assertGreater(png.stat().st_size, 20000, name)
            meta = json.loads(text["Comment"])
            self.assertEqual((meta["git_sha"], meta["created_utc"]), (sha, created))
            raw = pdf.read_bytes()
            self.assertTrue(raw.startswith(b"%PDF-") and b"%%EOF" in raw[-64:], name)
            self.assertIn(sha.encode(), raw)
            box = re.search(rb"/MediaBox \[ *0 0 ([0-9.]+) ([0-9.]+) *\]", raw)
            self.assertIn(round(float(box.group(1)) / 72, 2), (figs.SINGLE_COLUMN_IN, figs.DOUBLE_COLUMN_IN))
        for name in skipped:
            self.assertFalse((out / f"{name}.png").exists(), name)
        summary = (out / "summary.md").read_text()
        self.assertIn(sha, summary)
        for name in names:
            self.assertIn(f"]({name}.png)", summary)
        for name in skipped:
            self.assertIn(f"`{name}`: not drawn", summary)
        return summary

    def check_key_table(self, path: Path, summary: str):
        """Best recall per selector at each budget and the frontier, recomputed from h5py."""
        with h5py.File(path, "r") as f:
            t = h5_rows(f)
            C = len(f["captures"])
            kind = h5_attr(f["sweep"], "budget_kind")
        pooled = pooled_mask(t, C)
        for b in sorted(set(t["budget"][pooled].tolist())):
            heading = f"### {b:g} tokens" if kind == "tokens" else f"### sparsity {b:g}"
            self.assertIn(heading, summary)
            section = summary.split(heading, 1)[1].split("###", 1)[0]
            best = {}
            for i in np.flatnonzero(pooled & (t["budget"] == b)):
                v = t["mass_recall"][i]
                s = t["selector"][i]
                if np.isfinite(v) and (s not in best or v > best[s]):
                    best[s] = v
            ranked = sorted(best.items(), key=lambda kv: -kv[1])
            for rank, (sel, v) in enumerate(ranked, 1):
                self.assertRegex(section, rf"\| {rank} \| {re.escape(sel)} \| [^|]+ \| {v:.4f} \|")
        frontier = summary.split("## Pareto frontier", 1)[1].split("##", 1)[0]
        pts = [(t["kv_bytes"][i], t["mass_recall"][i]) for i in np.flatnonzero(pooled)
               if np.isfinite(t["kv_bytes"][i]) and np.isfinite(t["mass_recall"][i])]
        expected = sorted({(x, y) for x, y in pts
                           if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2 in pts)})
        rows = [l for l in frontier.splitlines() if re.match(r"\| \d+ \|", l)]
        self.assertEqual(len(rows), len(expected))
        for line, (x, y) in zip(rows, expected):
            self.assertIn(f"| {y:.4f} | {summary_bytes(x)} |", line)

    def test_tokens(self):
        out = Fixtures.work / "out_tokens"
        proc = self.run_ok(Fixtures.tokens, out)
        summary = self.check_files(Fixtures.tokens, out, TOKEN_SWEEP_FIGURES, [REALISED])
        self.assertIn("# hysparse sweep: sweep.h5", summary)
        self.assertIn("## Best recall per selector at each budget", summary)
        self.assertIn("## Per capture", summary)
        self.assertNotIn("partial sweep", summary.lower())
        self.check_key_table(Fixtures.tokens, summary)
        self.assertIn("3 figures", proc.stdout)

    def test_sparsity_single_capture(self):
        out = Fixtures.work / "out_sparsity"
        self.run_ok(Fixtures.sparsity, out, "--formats", "png,pdf,svg")
        summary = self.check_files(Fixtures.sparsity, out, ["sweep_recall_vs_sparsity", REALISED, "sweep_pareto"],
                                   ["sweep_per_capture"])
        self.assertTrue((out / "sweep_pareto.svg").read_text().lstrip().startswith(("<?xml", "<svg")))
        self.check_key_table(Fixtures.sparsity, summary)
        self.assertNotIn("## Per capture", summary)

    def test_partial(self):
        out = Fixtures.work / "out_partial"
        proc = self.run_ok(Fixtures.partial, out)
        self.assertIn("warning: partial sweep", proc.stdout)
        summary = self.check_files(Fixtures.partial, out, TOKEN_SWEEP_FIGURES, [REALISED])
        rep = load_report(Fixtures.partial)
        self.assertIn(f"**Warning: partial sweep.** {rep.units_done} of {rep.units_total} work units", summary)
        self.check_key_table(Fixtures.partial, summary)

    def test_budget_option(self):
        out = Fixtures.work / "out_budget"
        self.run_ok(Fixtures.tokens, out, "--budget", "128", "--formats", "png")
        self.assertIn("at budget 128;", (out / "summary.md").read_text())
        for args, needle in ((("--budget", "100"), "budget '100' is not in the sweep"),
                             (("--layer", "1"), "--layer does not apply to a sweep report")):
            proc = run_cli(Fixtures.tokens, "--out", out, *args)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            self.assertIn(needle, proc.stderr)


class SweepBadInputTest(unittest.TestCase):
    """Broken sweep files: ReportError with one line naming the problem; exit code 2."""

    def broken(self, name, edit, src=None):
        p = Fixtures.work / name
        shutil.copy(src or Fixtures.partial, p)
        with h5py.File(p, "r+") as f:
            edit(f)
        return p

    def expect(self, path, *needles, cli=False):
        """ReportError with one line naming the problem; with cli, also exit code 2 and that line on stderr."""
        with self.assertRaises(ReportError) as ctx:
            load_report(path)
        msg = str(ctx.exception)
        self.assertEqual(len(msg.splitlines()), 1, msg)
        self.assertIn("expected", msg)
        for n in needles:
            self.assertIn(n, msg)
        if cli:
            proc = run_cli(path, "--out", Fixtures.work / "out_bad")
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertEqual(proc.stderr.strip().splitlines(), [f"analysis: {msg}"])

    def test_unknown_version(self):
        p = self.broken("v2.h5", lambda f: f.attrs.__setitem__("format_version", np.int64(2)))
        self.expect(p, "format_version 2 is not supported", "expected format_version 1", cli=True)

    def test_missing_column(self):
        p = self.broken("nocol.h5", lambda f: f["sweep/points"].__delitem__("kv_bytes"))
        self.expect(p, "missing dataset '/sweep/points/kv_bytes'", "sweep report", cli=True)

    def test_ragged_columns(self):
        def edit(f):
            del f["sweep/points/mass_recall"]
            f["sweep/points"].create_dataset("mass_recall", data=np.zeros(3))
        self.expect(self.broken("ragged.h5", edit), "/sweep/points/mass_recall has 3 rows")

    def test_bad_status(self):
        self.expect(self.broken("status.h5", lambda f: f["sweep"].attrs.__setitem__("status", "running")),
                    "/sweep status is 'running'")

    def test_units_done_over_total(self):
        self.expect(self.broken("units.h5", lambda f: f["sweep"].attrs.__setitem__("units_done", np.int64(999))),
                    "units_done 999 > units_total")

    def test_missing_capture_group(self):
        # A complete sweep has a group per capture (a partial one only for the captures it started).
        self.expect(self.broken("nocap.h5", lambda f: f["captures"].__delitem__("1"), Fixtures.tokens),
                    "/captures has 1 groups but /sweep/axes/capture has 2 captures")

    def test_bad_capture_selector(self):
        p = self.broken("capsel.h5", lambda f: f["captures/0/selectors/oracle"].__delitem__("model_mass_recall_p10"))
        self.expect(p, "missing dataset '/captures/0/selectors/oracle/model_mass_recall_p10'")

    def test_load_sweep_refuses_a_replay_report(self):
        with self.assertRaises(ReportError) as ctx:
            load_sweep(Fixtures.work / "fx_partial" / "sweep_replay_0_0.h5")
        self.assertIn("not a sweep report", str(ctx.exception))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hysparse", required=True, help="path to the hysparse binary")
    ap.add_argument("--workdir", default=None, help="directory for fixtures and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the fixtures and outputs")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    start = time.time()
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for case in (SweepLoaderTest, SweepFigureDataTest, SweepCliTest, SweepBadInputTest):
        suite.addTests(loader.loadTestsFromTestCase(case))
    try:
        Fixtures.build(args.hysparse, args.workdir or tempfile.gettempdir())
    except Exception as e:  # noqa: BLE001 - every test needs the fixtures
        print(f"cannot make the sweep reports: {e}", file=sys.stderr)
        print(f"0 passed, {suite.countTestCases()} failed")
        return 1
    print(f"sweep reports: {'hysparse sweep' if Fixtures.real else 'h5py fixture (no hysparse sweep)'} "
          f"({time.time() - start:.1f} s)")
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if args.verbose else 1).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - failed - len(result.skipped)
    if not args.keep and failed == 0:
        shutil.rmtree(Fixtures.work, ignore_errors=True)
    else:
        print(f"fixtures and outputs kept in {Fixtures.work}")
    print(f"({time.time() - start:.1f} s)")
    print(f"{passed} passed, {failed + len(result.skipped)} failed")
    return 0 if failed == 0 and not result.skipped else 1


if __name__ == "__main__":
    sys.exit(main())
