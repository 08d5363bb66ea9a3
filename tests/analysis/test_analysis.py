#!/usr/bin/env python3
"""Tests of the analysis package (loader, figures, summary, command line) against real reports.

Run from the repository root:

    /usr/bin/python3 tests/analysis/test_analysis.py --hysparse build/src/cli/hysparse --workdir /tmp/analysis-tests

It makes small captures and reports with the tool (synth, then replay with v and a reuse matrix; a
sparsity report; a report without v and without a reuse matrix; a report of the proxy selectors that
keep, evict or split the KV cache; two KV-accounting reports of 'hysparse kv -o'), renders every figure,
and checks
that the numbers the loader hands to the plots are the datasets read directly with h5py (the KV bytes
of the recall-vs-KV figure: the /kv datasets, or the documented formula from the selector attributes), that
the files are valid PNG/PDF of paper size with provenance metadata, and that bad inputs give ReportError
and exit code 2. Standard library unittest only; the last line printed is "N passed, M failed".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from analysis import ReportError, load_report  # noqa: E402
from analysis import figures as figs  # noqa: E402
from analysis.summary import ranked_table  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAPER_WIDTHS_PX = {int(round(figs.SINGLE_COLUMN_IN * figs.PNG_DPI)), int(round(figs.DOUBLE_COLUMN_IN * figs.PNG_DPI))}


class Fixtures:
    """Reports made once per run by the hysparse binary."""

    hysparse: str = ""
    work: Path = Path(".")
    tokens: Path = Path(".")      # token budgets, v captured, reuse matrix, 5 selectors (FSSS)
    sparsity: Path = Path(".")    # sparsity budgets, default selectors
    lean: Path = Path(".")        # no v, no reuse matrix, last:N queries
    kvsel: Path = Path(".")       # selectors that keep, evict or split the KV cache (quest, h2o, snapkv, duo, ...)
    kv: Path = Path(".")          # hysparse kv -o: hysparse-80b-a3b, full / hybrid-swa / hysparse, 4K..1M
    kv2: Path = Path(".")         # hysparse kv -o: llama-3.1-8b, full / quest / snapkv / h2o / duo
    capture: Path = Path(".")

    @classmethod
    def build(cls, hysparse: str, workdir: str) -> None:
        cls.hysparse = str(Path(hysparse).resolve())
        os.makedirs(workdir, exist_ok=True)
        cls.work = Path(tempfile.mkdtemp(prefix="analysis-", dir=workdir))
        cls.capture = cls.work / "cap.h5"
        nov = cls.work / "cap_nov.h5"
        cls.tokens, cls.sparsity, cls.lean = cls.work / "r.h5", cls.work / "rs.h5", cls.work / "rl.h5"
        shape = ["--layers", "6", "--seq-len", "384", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32"]
        cls.run_tool(["synth", "-o", str(cls.capture)] + shape)
        cls.run_tool(["synth", "-o", str(nov), "--no-v", "--seed", "3"] + shape)
        cls.run_tool(["replay", str(cls.capture), "-o", str(cls.tokens), "--budget", "64,128,256",
                      "--selectors", "oracle,oracle:group=sum,swa,swa:window=64,hysparse", "--schedule", "FSSS",
                      "--reuse-budget", "128", "--threads", "2", "-q"])
        cls.run_tool(["replay", str(cls.capture), "-o", str(cls.sparsity), "--sparsity", "0.5,0.75,0.9",
                      "--threads", "2", "-q"])
        cls.run_tool(["replay", str(nov), "-o", str(cls.lean), "--budget", "128,256", "--selectors",
                      "oracle,hysparse", "--schedule", "1:2", "--reuse-budget", "0", "--queries", "last:64",
                      "--threads", "2", "-q"])
        cls.kvsel, cls.kv, cls.kv2 = cls.work / "rkv.h5", cls.work / "kv.h5", cls.work / "kv2.h5"
        cls.run_tool(["replay", str(nov), "-o", str(cls.kvsel), "--budget", "64,128,256", "--selectors",
                      "oracle,quest,h2o,snapkv,duo:sinks=16,recent=64,swa:window=64,sinks=4,hysparse:window=64",
                      "--schedule", "1:2", "--reuse-budget", "0", "--threads", "2", "-q"])
        cls.run_tool(["kv", "--preset", "hysparse-80b-a3b", "--context", "4K,16K,32K,128K,1M", "-o", str(cls.kv)])
        cls.run_tool(["kv", "--preset", "llama-3.1-8b", "--context", "4K,32K,128K", "--method",
                      "full,quest,snapkv,h2o,duo", "-o", str(cls.kv2)])

    @classmethod
    def run_tool(cls, args: list) -> None:
        proc = subprocess.run([cls.hysparse] + args, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"hysparse {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)


def h5_attr(obj, key):
    v = obj.attrs[key]
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def matplotlib_rgb(colour):
    from matplotlib import colors
    return colors.to_rgb(colour)


def assert_same(test: unittest.TestCase, a, b, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    test.assertEqual(a.shape, b.shape, f"{what}: shape")
    test.assertTrue(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"),
                    f"{what}: values differ\n{a}\n{b}")


def summary_bytes(value) -> str:
    """Binary units as summary.md writes them (2 decimals)."""
    v = float(value)
    for div, unit in ((1024.0 ** 4, "TiB"), (1024.0 ** 3, "GiB"), (1024.0 ** 2, "MiB"), (1024.0, "KiB")):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f} B"


def h5_strings(ds):
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.atleast_1d(ds[()]).tolist()]


def kv_root(f):
    """The group of a KV table: /kv in a replay report, the root (or /kv) of a KV report."""
    return f if "method" in f else f["kv"]


def expected_kv_bytes(f, label):
    """KV bytes per sequence at T of one selector per budget, from the README's rules and the attributes
    (read here with h5py, independently of analysis/kvbytes.py): (K/V bytes, metadata bytes)."""
    g = f["selectors"][label]
    cap = f["capture"]
    T, L, hkv = int(h5_attr(cap, "seq_len")), int(h5_attr(cap, "num_layers")), int(h5_attr(cap, "num_kv_heads"))
    bpt = int(h5_attr(f["kv"], "bytes_per_token_per_layer"))          # one token, one layer, all KV heads
    assert bpt == 2 * hkv * int(h5_attr(cap, "head_dim")) * 2, "bf16 K and V"
    budgets = f["axes/budget"][()]
    sparsity = h5_attr(f["axes/budget"], "kind") == "sparsity"
    B = int(h5_attr(g, "block_size"))
    sinks, window = int(h5_attr(g, "sinks")), int(h5_attr(g, "window"))
    residency = h5_attr(g, "kv_residency")
    spec = dict(p.split("=", 1) for p in h5_attr(g, "spec").partition(":")[2].split(",") if "=" in p)

    def budget_tokens(b, block, row):  # Budget::blocks_for_row x block
        if not sparsity:
            return int(b) // block * block
        return max(1, int(np.ceil((1 - b) * (row + 1) / block - 1e-9))) * block

    per_layer = []  # tokens per KV head, summed over layers, per budget
    for b in budgets:
        if residency == "full KV, a budget attended per step":
            n = T * L
        elif residency.startswith("full layers all tokens"):
            full = g["is_full_layer"][()] != 0
            n = int(full.sum()) * T + int((~full).sum()) * min(T, window + sinks)
        elif residency == "sinks + window on every layer":
            w = budget_tokens(b, B, T - 1) if window < 0 else window
            n = min(T, w + sinks) * L
        elif residency == "a token budget kept" and h5_attr(g, "kv_footprint") == "snapkv":
            P = int(h5_attr(g, "first_scored_position"))
            n = min(T, budget_tokens(b, 1, P - 1) + (T - P)) * L
        elif residency == "a token budget kept":
            n = min(T, budget_tokens(b, 1, T)) * L
        elif residency == "retrieval heads full, streaming heads sinks + recent":
            streaming = L * hkv * int(spec["streaming"]) // 100
            n = (streaming * min(T, int(spec["sinks"]) + int(spec["recent"])) + (L * hkv - streaming) * T) / hkv
        else:
            raise AssertionError(f"{label}: residency {residency!r} not covered by the test")
        per_layer.append(float(n))
    tokens = np.array(per_layer) * hkv
    meta = float(h5_attr(g, "kv_metadata_bytes_per_token_per_kv_head"))
    return tokens * (bpt / hkv), tokens * meta


def has_kv_resident(path) -> bool:
    """Whether a replay report carries the C++-priced kv_resident_bytes (newer tools)."""
    with h5py.File(path, "r") as f:
        return all("kv_resident_bytes" in f["selectors"][l] for l in h5_attr(f["selectors"], "order"))


def strip_kv_resident(src, dst) -> Path:
    """A copy of a replay report as older tools wrote it: no kv_resident_bytes, no kv_full_bytes."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for label in h5_attr(f["selectors"], "order"):
            if "kv_resident_bytes" in f["selectors"][label]:
                del f["selectors"][label]["kv_resident_bytes"]
        if "kv_full_bytes" in f["selectors"].attrs:
            del f["selectors"].attrs["kv_full_bytes"]
    return Path(dst)


def png_info(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path}: not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: first chunk is not IHDR"
    width, height = struct.unpack(">II", data[16:24])
    text = {}
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        assert zlib.crc32(ctype + body) & 0xFFFFFFFF == crc, f"{path}: bad CRC in {ctype!r}"
        if ctype == b"tEXt":
            k, _, v = body.partition(b"\0")
            text[k.decode("latin-1")] = v.decode("latin-1")
        elif ctype == b"iTXt":
            k, _, rest = body.partition(b"\0")
            flag, method = rest[0], rest[1]
            rest = rest[2:]
            _, _, rest = rest.partition(b"\0")  # language
            _, _, v = rest.partition(b"\0")     # translated keyword
            text[k.decode("latin-1")] = (zlib.decompress(v) if flag else v).decode("utf-8")
        pos += 12 + length
        if ctype == b"IEND":
            break
    assert pos == len(data), f"{path}: data after IEND or truncated"
    return width, height, text


class LoaderTest(unittest.TestCase):
    """The loader hands out exactly what the files hold."""

    def check_report(self, path: Path) -> None:
        rep = load_report(path)
        with h5py.File(path, "r") as f:
            for key in ("format", "format_version", "tool_version", "git_sha", "command_line", "created_utc",
                        "backend", "device", "seed", "threads", "input_files", "input_sha256",
                        "input_sha256_source"):
                self.assertEqual(rep.provenance[key], h5_attr(f, key), key)
            b = f["axes/budget"]
            assert_same(self, rep.budgets.values, b[()], "budgets")
            self.assertEqual(list(rep.budgets.labels), h5_attr(b, "labels"))
            self.assertEqual(rep.budgets.kind, h5_attr(b, "kind"))
            self.assertEqual(rep.budgets.units, h5_attr(b, "units"))
            assert_same(self, rep.layers, f["axes/layer"][()], "layers")
            assert_same(self, rep.heads, f["axes/head"][()], "heads")
            assert_same(self, rep.query_positions, f["axes/query_position"][()], "query positions")
            self.assertEqual(list(rep.selector_order), h5_attr(f["selectors"], "order"))
            self.assertEqual(rep.config, json.loads(h5_attr(f["config"], "json")))
            self.assertEqual(rep.capture["num_layers"], h5_attr(f["capture"], "num_layers"))
            n_checked = 0
            for label in rep.selector_order:
                g = f["selectors"][label]
                s = rep.selector(label)
                for key in ("spec", "description", "block_size", "sinks", "window", "selection"):
                    self.assertEqual(getattr(s, key), h5_attr(g, key), f"{label} {key}")
                self.assertEqual(s.window_is_budget, bool(h5_attr(g, "window_is_budget")))
                self.assertEqual(s.name, h5_attr(g, "spec").split(":")[0])
                self.assertEqual(set(s.arrays), {k for k in g if isinstance(g[k], h5py.Dataset)})
                for name, ds in g.items():
                    assert_same(self, s[name], ds[()], f"{label}/{name}")
                    if name != "is_full_layer":
                        self.assertEqual(s.arrays[name].units, h5_attr(ds, "units"), f"{label}/{name} units")
                        self.assertEqual(s.arrays[name].long_name, h5_attr(ds, "long_name"))
                    n_checked += 1
                assert_same(self, s.is_full_layer, g["is_full_layer"][()] != 0, f"{label} full layers")
                # The helper names point at the right datasets.
                assert_same(self, s.metric("mass_recall", "model", "p10"), g["model_mass_recall_p10"][()], "p10")
                assert_same(self, s.metric("mass_recall", "model", sparse_layers=True),
                            g["model_mass_recall_mean_sparse_layers"][()], "sparse")
                assert_same(self, s.metric("attended_keys", "layer"), g["layer_attended_keys_mean"][()], "keys")
                self.assertFalse(s["mass_recall_mean"].flags.writeable, "arrays are read-only")
            self.assertGreater(n_checked, 30)
            if "reuse" in f:
                assert_same(self, rep.reuse.mass_recall, f["reuse/mass_recall"][()], "reuse")
                self.assertEqual(rep.reuse.budget_tokens, h5_attr(f["reuse"], "budget_tokens"))
                self.assertEqual(rep.reuse.block_size, h5_attr(f["reuse"], "block_size"))
            else:
                self.assertIsNone(rep.reuse)
            self.assertEqual(rep.has_output_error, "output_rel_error_mean" in f["selectors"][rep.selector_order[0]])
            if "kv" in f:  # KV accounting, written by newer tools
                kv = f["kv"]
                self.assertEqual(list(rep.kv.methods), [m.decode() if isinstance(m, bytes) else m
                                                        for m in kv["method"][()].tolist()])
                assert_same(self, rep.kv.contexts, kv["context"][()], "kv contexts")
                M, C = len(rep.kv.methods), rep.kv.contexts.size
                tables = [k for k in kv if k not in ("method", "context", "layer") and kv[k].shape[:2] == (M, C)]
                self.assertEqual(sorted(rep.kv.arrays), sorted(tables))
                for k in tables:
                    assert_same(self, rep.kv[k], kv[k][()], f"kv/{k}")
            else:
                self.assertIsNone(rep.kv)

    def test_tokens_report(self):
        self.check_report(Fixtures.tokens)
        rep = load_report(Fixtures.tokens)
        self.assertTrue(rep.budgets.is_tokens)
        self.assertTrue(rep.has_output_error)
        self.assertIsNotNone(rep.reuse)
        # Labels: "oracle", then "oracle:group=sum" (or "oracle_2" from older tools), ...
        self.assertEqual(len(rep.selector_order), 5)
        self.assertEqual((rep.selector_order[0], rep.selector_order[2], rep.selector_order[4]),
                         ("oracle", "swa", "hysparse"))
        self.assertEqual([rep.selector(l).name for l in rep.selector_order],
                         ["oracle", "oracle", "swa", "swa", "hysparse"])
        self.assertEqual(rep.selector(rep.selector_order[1]).params["group"], "sum")
        self.assertEqual(rep.hysparse.label, "hysparse")
        self.assertEqual(list(rep.hysparse.full_layers), [0, 4])
        self.assertEqual(rep.budgets.index("128"), 1)
        self.assertEqual(rep.budgets.index(256), 2)
        with self.assertRaises(ValueError):
            rep.budgets.index("100")
        m = rep.reuse.masked()
        f, l = np.indices(m.shape)
        assert_same(self, m.mask, f > l, "reuse mask")

    def test_sparsity_report(self):
        self.check_report(Fixtures.sparsity)
        rep = load_report(Fixtures.sparsity)
        self.assertTrue(rep.budgets.is_sparsity)
        self.assertEqual(rep.budgets.index("s=0.9"), rep.budgets.index(0.9))

    def test_lean_report(self):
        self.check_report(Fixtures.lean)
        rep = load_report(Fixtures.lean)
        self.assertFalse(rep.has_output_error)
        self.assertIsNone(rep.reuse)
        self.assertIsNone(rep.selector("oracle").metric("output_rel_error", "model"))
        self.assertEqual(rep.num_rows, 64)

    def test_kv_group(self):
        """A /kv group (method x context datasets) is loaded when present."""
        path = Fixtures.work / "with_kv.h5"
        shutil.copy(Fixtures.tokens, path)
        with h5py.File(path, "r+") as f:
            if "kv" in f:
                del f["kv"]
        methods = ["full", "hysparse"]
        contexts = np.array([4096, 32768], dtype=np.int64)
        resident = np.array([[100, 800], [40, 300]], dtype=np.int64)
        per_layer = np.arange(2 * 2 * 6, dtype=np.int64).reshape(2, 2, 6)
        with h5py.File(path, "r+") as f:
            g = f.create_group("kv")
            g.attrs["model"] = "hysparse-7b"
            g.create_dataset("method", data=np.array(methods, dtype=h5py.string_dtype()))
            g.create_dataset("context", data=contexts)
            g.create_dataset("layer", data=np.arange(6, dtype=np.int64))
            d = g.create_dataset("resident_bytes", data=resident)
            d.attrs["units"] = "bytes"
            d.attrs["long_name"] = "resident KV cache"
            g.create_dataset("resident_bytes_per_layer", data=per_layer)
        rep = load_report(path)
        self.assertIsNotNone(rep.kv)
        self.assertEqual(rep.kv.methods, tuple(methods))
        assert_same(self, rep.kv.contexts, contexts, "kv contexts")
        assert_same(self, rep.kv["resident_bytes"], resident, "kv resident")
        assert_same(self, rep.kv["resident_bytes_per_layer"], per_layer, "kv per layer")
        self.assertEqual(rep.kv.arrays["resident_bytes"].units, "bytes")
        self.assertEqual(rep.kv.attrs["model"], "hysparse-7b")
        out = Fixtures.work / "out_kv"
        proc = run_cli(path, "--out", out, "-q")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("KV accounting", (out / "summary.md").read_text())


class KvReportLoaderTest(unittest.TestCase):
    """'hysparse kv -o' reports load through the same loader: no selectors, the KV table from the root."""

    def check_kv_report(self, path: Path) -> None:
        rep = load_report(path)
        self.assertEqual(rep.kind, "kv")
        self.assertTrue(rep.is_kv_report)
        self.assertEqual(rep.selectors, {})
        self.assertEqual(len(rep.budgets), 0)
        self.assertIsNone(rep.reuse)
        with h5py.File(path, "r") as f:
            self.assertEqual(h5_attr(f, "format"), "hysparse-kv-report")
            for key in ("format_version", "tool_version", "git_sha", "command_line", "created_utc", "input_files"):
                self.assertEqual(rep.provenance[key], h5_attr(f, key), key)
            g = kv_root(f)
            self.assertEqual(list(rep.kv.methods), h5_strings(g["method"]))
            assert_same(self, rep.kv.contexts, g["context"][()], "contexts")
            M, C = len(rep.kv.methods), rep.kv.contexts.size
            tables = [k for k in g if isinstance(g[k], h5py.Dataset) and k not in ("method", "context", "layer")
                      and g[k].shape[:2] == (M, C)]
            self.assertIn("resident_bytes", tables)
            self.assertEqual(sorted(rep.kv.arrays), sorted(tables))
            for k in tables:
                assert_same(self, rep.kv[k], g[k][()], k)
                self.assertEqual(rep.kv.arrays[k].units, h5_attr(g[k], "units"), k)
            self.assertEqual(rep.kv.batch, h5_attr(f, "batch"))
            self.assertEqual(rep.num_layers, h5_attr(f, "num_layers"))
            self.assertEqual([rep.kv.method_attr("resolved", i) for i in range(M)], h5_attr(g["method"], "resolved"))

    def test_kv_reports(self):
        self.check_kv_report(Fixtures.kv)
        self.check_kv_report(Fixtures.kv2)
        rep = load_report(Fixtures.kv)
        self.assertEqual(rep.kv.methods, ("full", "hybrid-swa", "hysparse"))
        self.assertEqual(rep.input_name, "preset:hysparse-80b-a3b")

    def test_kv_report_with_kv_group(self):
        """The same table under /kv instead of the root loads the same."""
        path = Fixtures.work / "kv_group.h5"
        with h5py.File(Fixtures.kv, "r") as src, h5py.File(path, "w") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            g = dst.create_group("kv")
            for k in src:
                data = src[k][()]
                ds = g.create_dataset(k, data=data)
                for a, v in src[k].attrs.items():
                    if a not in ("DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME"):
                        ds.attrs[a] = v
        a, b = load_report(Fixtures.kv), load_report(path)
        self.assertEqual(a.kv.methods, b.kv.methods)
        self.assertEqual(sorted(a.kv.arrays), sorted(b.kv.arrays))
        for k in a.kv.arrays:
            assert_same(self, a.kv[k], b.kv[k], k)
        rendered = figs.build(b, "kv_memory")
        for i, m in enumerate(b.kv.methods):
            assert_same(self, rendered.data["methods"][m], a.kv["resident_bytes"][i], m)


class FigureDataTest(unittest.TestCase):
    """What the figures draw is what the file holds (read here with h5py, not through the loader)."""

    @classmethod
    def setUpClass(cls):
        cls.rep = load_report(Fixtures.tokens)
        cls.f = h5py.File(Fixtures.tokens, "r")

    @classmethod
    def tearDownClass(cls):
        cls.f.close()

    def ds(self, label, name):
        return self.f["selectors"][label][name][()]

    @staticmethod
    def lines_by_gid(fig):
        out = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                if line.get_gid():
                    out[line.get_gid()] = line
        return out

    def test_recall_vs_budget(self):
        r = figs.build(self.rep, "recall_vs_budget")
        lines = self.lines_by_gid(r.figure)
        budgets = self.f["axes/budget"][()]
        for label in h5_attr(self.f["selectors"], "order"):
            d = r.data["selectors"][label]
            assert_same(self, d["mean"], self.ds(label, "model_mass_recall_mean"), f"{label} mean")
            assert_same(self, d["p10"], self.ds(label, "model_mass_recall_p10"), f"{label} p10")
            assert_same(self, d["p50"], self.ds(label, "model_mass_recall_p50"), f"{label} p50")
            assert_same(self, lines[f"mean:{label}"].get_ydata(), self.ds(label, "model_mass_recall_mean"), label)
            assert_same(self, lines[f"mean:{label}"].get_xdata(), budgets, f"{label} x")
            assert_same(self, lines[f"keys:{label}"].get_xdata(), self.ds(label, "model_attended_keys_mean"), label)
            self.assertEqual(lines[f"mean:{label}"].get_color(), figs.report_styles(self.rep)[label]["color"])
        assert_same(self, lines["sparse:hysparse"].get_ydata(),
                    self.ds("hysparse", "model_mass_recall_mean_sparse_layers"), "hysparse sparse layers")
        self.assertNotIn("sparse:oracle", lines)
        # The p10..p50 band: its polygon spans exactly p10..p50.
        ax = r.figure.axes[0]
        bands = {c.get_gid(): c for c in ax.collections if (c.get_gid() or "").startswith("band:")}
        verts = bands["band:oracle"].get_paths()[0].vertices[:, 1]
        lo, hi = self.ds("oracle", "model_mass_recall_p10"), self.ds("oracle", "model_mass_recall_p50")
        self.assertAlmostEqual(float(np.min(verts)), float(np.min(lo)), places=12)
        self.assertAlmostEqual(float(np.max(verts)), float(np.max(hi)), places=12)
        self.assertEqual(ax.get_xscale(), "log")

    def test_layer_heatmap(self):
        for bi in (None, 0):
            r = figs.build(self.rep, "layer_heatmap", budget_index=bi)
            b = len(self.f["axes/budget"]) // 2 if bi is None else bi
            order = h5_attr(self.f["selectors"], "order")
            expected = np.stack([self.ds(l, "layer_mass_recall_mean")[b] for l in order])
            image = [im for im in r.figure.axes[0].get_images() if im.get_gid() == "heatmap"][0]
            assert_same(self, np.asarray(image.get_array()), expected, "heatmap image")
            assert_same(self, r.data["matrix"], expected, "heatmap data")
            full = list(np.flatnonzero(self.ds("hysparse", "is_full_layer")))
            self.assertEqual(r.data["full_layers"]["hysparse"], full)
            markers = [l for l in r.figure.axes[0].get_lines() if l.get_gid() == "full-marker"]
            self.assertEqual(sorted(float(m.get_xdata()[0]) for m in markers), [float(x) for x in full])

    def test_reuse_matrix(self):
        r = figs.build(self.rep, "reuse_matrix")
        raw = self.f["reuse/mass_recall"][()]
        image = [im for im in r.figure.axes[0].get_images() if im.get_gid() == "reuse"][0]
        arr = image.get_array()
        f, l = np.indices(raw.shape)
        assert_same(self, np.ma.getmaskarray(arr), f > l, "reuse mask")
        assert_same(self, arr.data[f <= l], raw[f <= l], "reuse values")
        self.assertTrue(np.all(np.isnan(raw[f > l])), "the file has NaN where f > l")
        # Used pairs: every sparse layer with its preceding full layer (FSSS over 6 layers: full 0 and 4).
        self.assertEqual(r.data["used_pairs"], [(0, 1), (0, 2), (0, 3), (4, 5)])

    def test_hysparse_distance(self):
        r = figs.build(self.rep, "hysparse_distance")
        full = self.ds("hysparse", "is_full_layer") != 0
        # Distance computed independently here.
        dist, last = [], None
        for i, is_full in enumerate(full):
            last = i if is_full else last
            dist.append(i - last)
        dist = np.array(dist)
        assert_same(self, r.data["distance"], dist, "distance")
        lines = self.lines_by_gid(r.figure)
        rec = self.ds("hysparse", "layer_mass_recall_mean")
        vso = self.ds("hysparse", "layer_recall_vs_oracle_mean")
        labels = h5_attr(self.f["axes/budget"], "labels")
        for bi, lab in enumerate(labels):
            for key, values in (("mass_recall", rec), ("recall_vs_oracle", vso)):
                expected = [np.mean(values[bi, dist == d]) for d in (1, 2, 3)]
                np.testing.assert_allclose(r.data[key][lab], expected, rtol=0, atol=1e-15)
                np.testing.assert_allclose(lines[f"mean:{key}:{lab}"].get_ydata(), expected, rtol=0, atol=1e-15)
                assert_same(self, lines[f"mean:{key}:{lab}"].get_xdata(), [1, 2, 3], "distances")

    def test_output_error(self):
        r = figs.build(self.rep, "output_error")
        lines = self.lines_by_gid(r.figure)
        for label in self.rep.selector_order:
            assert_same(self, lines[f"mean:{label}"].get_ydata(), self.ds(label, "model_output_rel_error_mean"), label)
        assert_same(self, lines["sparse:hysparse"].get_ydata(),
                    self.ds("hysparse", "model_output_rel_error_mean_sparse_layers"), "sparse")

    def test_head_boxplot(self):
        r = figs.build(self.rep, "head_boxplot", budget_index=0, layer=2)
        for label in self.rep.selector_order:
            expected = self.ds(label, "mass_recall_mean")[0, 2, :]
            assert_same(self, r.data["per_head"][label], expected, label)
            pts = [c for c in r.figure.axes[0].collections if c.get_gid() == f"heads:{label}"][0]
            assert_same(self, pts.get_offsets()[:, 0], expected, f"{label} points")
        # Default layer: the first sparse layer of hysparse (1 here).
        self.assertEqual(figs.build(self.rep, "head_boxplot").data["layer"], 1)

    def test_kv_memory(self):
        """The replay report's /kv table: one line per method, resident_bytes over context, ratios at the end."""
        r = figs.build(self.rep, "kv_memory")
        kv = self.f["kv"]
        methods = h5_strings(kv["method"])
        ctx = kv["context"][()]
        resident = kv["resident_bytes"][()]
        lines = self.lines_by_gid(r.figure)
        for i, m in enumerate(methods):
            assert_same(self, lines[f"kv:{m}"].get_xdata(), ctx, f"{m} contexts")
            assert_same(self, lines[f"kv:{m}"].get_ydata(), resident[i], f"{m} resident bytes")
            assert_same(self, r.data["methods"][m], resident[i], m)
        assert_same(self, r.data["full_attention_bytes"], kv["full_attention_bytes"][0], "full")
        ax = r.figure.axes[0]
        self.assertEqual((ax.get_xscale(), ax.get_yscale()), ("log", "log"))
        ratio = kv["ratio_to_full"][()]
        texts = {t.get_gid(): t.get_text() for t in ax.texts if (t.get_gid() or "").startswith("ratio:")}
        for gid, text in texts.items():
            members = gid[len("ratio:"):].split(",")
            for m in members:
                self.assertEqual(text, f"{ratio[methods.index(m), -1]:.3g}x", gid)
        # Every method but full has its ratio at the largest context; full attention is the reference.
        self.assertEqual(sorted(m for gid in texts for m in gid[len("ratio:"):].split(",")),
                         sorted(m for m in methods if m != "full"))
        for m in methods:
            if m != "full":
                self.assertEqual(r.data["ratio_at_largest"][m], ratio[methods.index(m), -1])
        labels = [figs.bytes_label(t) for t in ax.get_yticks()]
        self.assertTrue(all(l.endswith("iB") or l.endswith(" B") for l in labels), labels)

    def test_recall_vs_kv_report_bytes(self):
        """x: the report's kv_resident_bytes as written, full KV its kv_full_bytes (a copy given values unlike any
        formula, so that only reading them passes); y: model mean recall."""
        path = strip_kv_resident(Fixtures.tokens, Fixtures.work / "tokens_kvres.h5")
        with h5py.File(path, "r+") as f:
            for i, label in enumerate(h5_attr(f["selectors"], "order")):
                nb = f["axes/budget"].size
                d = f["selectors"][label].create_dataset("kv_resident_bytes",
                                                         data=1000.0 * (i + 1) + 7.0 * np.arange(nb))
                d.attrs["units"] = "bytes"
                d.attrs["long_name"] = "resident KV bytes"
            f["selectors"].attrs["kv_full_bytes"] = 123456.0
        rep = load_report(path)
        r = figs.build(rep, "recall_vs_kv")
        lines = self.lines_by_gid(r.figure)
        with h5py.File(path, "r") as f:
            for label in h5_attr(f["selectors"], "order"):
                d = r.data["selectors"][label]
                expected = f["selectors"][label]["kv_resident_bytes"][()]
                assert_same(self, d["bytes"], expected, label)
                assert_same(self, lines[f"kv:{label}"].get_xdata(), expected, f"{label} x")
                assert_same(self, lines[f"kv:{label}"].get_ydata(), f["selectors"][label]["model_mass_recall_mean"][()],
                            f"{label} y")
                self.assertEqual((d["source"], d["origin"]), ("report", f"/selectors/{label}/kv_resident_bytes"))
                self.assertIsNone(d["kv_bytes"])
        self.assertEqual(r.data["full_kv_bytes"], 123456.0)
        self.assertEqual(float(lines["full-kv"].get_xdata()[0]), 123456.0)
        self.assertIn("kv_resident_bytes", r.caption)
        self.assertNotIn("FALLBACK", r.caption)
        # Mixed: one selector without it is re-derived, and the caption says which.
        with h5py.File(path, "r+") as f:
            del f["selectors/swa/kv_resident_bytes"]
        r = figs.build(load_report(path), "recall_vs_kv")
        self.assertEqual(r.data["selectors"]["swa"]["source"], "fallback")
        self.assertEqual(r.data["selectors"]["oracle"]["source"], "report")
        self.assertIn("FALLBACK", r.caption)

    def test_kv_resident_bytes_match_readme_rules(self):
        """When the tool writes kv_resident_bytes (C++ footprint table), they agree with the README's residency
        rules (computed here from the attributes, independently of analysis/kvbytes.py)."""
        from analysis.kvbytes import selector_kv
        for path in (Fixtures.tokens, Fixtures.kvsel, Fixtures.sparsity):
            acc = selector_kv(load_report(path))
            if not has_kv_resident(path):  # an older tool: every selector priced by the labelled fallback
                self.assertEqual(acc.source, "fallback", path.name)
                continue
            self.assertEqual(acc.source, "report", path.name)
            with h5py.File(path, "r") as f:
                cap = f["capture"]
                heads_layers = int(h5_attr(cap, "num_layers")) * int(h5_attr(cap, "num_kv_heads"))
                for label in h5_attr(f["selectors"], "order"):
                    kv_b, meta = expected_kv_bytes(f, label)
                    g = f["selectors"][label]
                    # The footprint table also prices fixed-size metadata, which the README's per-token rules
                    # leave out: duo's one fp32 gate per KV head per layer.
                    fixed = 4.0 * heads_layers if h5_attr(g, "kv_footprint") == "duo" else 0.0
                    if fixed:
                        self.assertEqual(h5_attr(g, "kv_metadata"), "one fp32 gate per KV head per layer")
                    np.testing.assert_allclose(g["kv_resident_bytes"][()], kv_b + meta + fixed,
                                               rtol=1e-9, err_msg=f"{path.name} {label}")

    def test_recall_vs_kv(self):
        """Fallback for older reports (a copy without kv_resident_bytes): x re-derived from the /kv datasets and
        the documented formula; y: model mean recall."""
        path = strip_kv_resident(Fixtures.tokens, Fixtures.work / "tokens_fallback.h5")
        f = h5py.File(path, "r")
        self.addCleanup(f.close)
        r = figs.build(load_report(path), "recall_vs_kv")
        lines = self.lines_by_gid(r.figure)
        kv = f["kv"]
        T = int(h5_attr(f["capture"], "seq_len"))
        j = list(kv["context"][()]).index(T)
        methods = h5_strings(kv["method"])
        batch = int(h5_attr(kv, "batch"))
        full = kv["full_attention_bytes"][0, j] / batch
        self.assertEqual(r.data["full_kv_bytes"], full)
        hys = kv["kv_bytes"][methods.index("hysparse"), j] / batch
        points = []
        for label in h5_attr(f["selectors"], "order"):
            kv_b, meta = expected_kv_bytes(f, label)
            d = r.data["selectors"][label]
            self.assertEqual(d["source"], "fallback", label)
            recall = self.ds(label, "model_mass_recall_mean")
            assert_same(self, lines[f"kv:{label}"].get_ydata(), recall, f"{label} recall")
            assert_same(self, d["recall"], recall, label)
            np.testing.assert_allclose(d["kv_bytes"], kv_b, rtol=1e-12, err_msg=label)
            np.testing.assert_allclose(d["metadata_bytes"], meta, rtol=1e-12, err_msg=label)
            assert_same(self, lines[f"kv:{label}"].get_xdata(), d["kv_bytes"] + d["metadata_bytes"], f"{label} x")
            points += [(label, bi, x, y) for bi, (x, y) in enumerate(zip(kv_b + meta, recall))]
        # Numbers from the report: full-cache selectors use /kv/full_attention_bytes, hysparse its /kv row.
        for label in ("oracle", "oracle:group=sum"):
            if label in r.data["selectors"]:
                assert_same(self, r.data["selectors"][label]["kv_bytes"], np.full(3, full), label)
        assert_same(self, r.data["selectors"]["hysparse"]["kv_bytes"], np.full(3, hys), "hysparse /kv")
        self.assertTrue(r.data["selectors"]["hysparse"]["origin"].startswith("/kv/kv_bytes[hysparse"))
        # The Pareto frontier, by brute force: no other point with no more bytes and at least the recall.
        labels = h5_attr(f["axes/budget"], "labels")
        frontier = sorted((lab, labels[bi]) for lab, bi, x, y in points
                          if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, _, x2, y2 in points))
        got = sorted((lab, b) for lab, b, _, _ in r.data["frontier"])
        # Ties (the same bytes and recall) keep one point only.
        self.assertTrue(set(got) <= set(frontier) and len({(x, y) for _, _, x, y in r.data["frontier"]}) ==
                        len({(x, y) for lab, bi, x, y in points if (lab, labels[bi]) in frontier}), (got, frontier))
        fp = lines["frontier-points"]
        assert_same(self, fp.get_xdata(), [x for _, _, x, _ in r.data["frontier"]], "frontier x")
        assert_same(self, fp.get_ydata(), [y for _, _, _, y in r.data["frontier"]], "frontier y")
        self.assertEqual(r.figure.axes[0].get_xscale(), "log")
        full_line = lines["full-kv"]
        self.assertEqual(float(full_line.get_xdata()[0]), full)
        for word in (f"T = {T} tokens", "kv_metadata_bytes_per_token_per_kv_head", "Pareto frontier",
                     "/kv/full_attention_bytes", "/kv/kv_bytes[hysparse", "FALLBACK"):
            self.assertIn(word, r.caption)

    def test_summary_ranking(self):
        for bi in range(len(self.rep.budgets)):
            rows = ranked_table(self.rep, bi)
            means = [self.ds(r["label"], "model_mass_recall_mean")[bi] for r in rows]
            self.assertEqual(means, sorted(means, reverse=True))
            for row in rows:
                self.assertEqual(row["model_recall_vs_oracle_mean"],
                                 self.ds(row["label"], "model_recall_vs_oracle_mean")[bi])
                self.assertEqual(row["model_mass_recall_min"], self.ds(row["label"], "model_mass_recall_min")[bi])

    def test_style(self):
        """Fixed colours per selector label; paper widths; every text at least 8 pt."""
        self.assertEqual(figs.selector_style("oracle")["color"], "#000000")
        self.assertEqual(figs.selector_style("hysparse")["color"], "#D55E00")
        self.assertEqual(figs.selector_style("my_proxy"), figs.selector_style("my_proxy"))
        for variant in ("oracle:group=sum", "oracle_2"):
            st = figs.selector_style(variant)
            self.assertNotEqual((st["color"], st["linestyle"]), ("#000000", "-"), variant)
        # In one report, no two selectors look alike.
        styles = figs.report_styles(self.rep)
        looks = {(st["color"], str(st["linestyle"]), st["marker"]) for st in styles.values()}
        self.assertEqual(len(looks), len(styles))
        # Colours are consistent across the figures of a report (lines, box plot points).
        box = figs.build(self.rep, "head_boxplot")
        for label in self.rep.selector_order:
            pts = [c for c in box.figure.axes[0].collections if c.get_gid() == f"heads:{label}"][0]
            self.assertEqual(tuple(np.round(pts.get_facecolor()[0][:3], 6)),
                             tuple(np.round(matplotlib_rgb(styles[label]["color"]), 6)), label)
        sparse_rep = load_report(Fixtures.sparsity)
        for rep in (self.rep, sparse_rep):
            for name in figs.FIGURES:
                r = figs.build(rep, name)
                if r is None:
                    continue
                w, _ = r.figure.get_size_inches()
                self.assertIn(round(w, 2), (figs.SINGLE_COLUMN_IN, figs.DOUBLE_COLUMN_IN), name)
                for t in r.figure.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
                    if t.get_text().strip() and t.get_visible():
                        self.assertGreaterEqual(t.get_fontsize(), 8.0, f"{name}: {t.get_text()!r}")
            lines = self.lines_by_gid(figs.build(rep, "recall_vs_budget").figure)
            self.assertEqual(lines["mean:oracle"].get_color(), "#000000")
            self.assertEqual(lines["mean:hysparse"].get_color(), "#D55E00")


class KvFigureTest(unittest.TestCase):
    """Selectors that keep, evict or split the cache; sparsity budgets; standalone KV reports."""

    def check_recall_vs_kv(self, path: Path):
        """The fallback re-derivation (on a copy without kv_resident_bytes) against the README's rules."""
        path = strip_kv_resident(path, Fixtures.work / f"fallback_{Path(path).name}")
        rep = load_report(path)
        r = figs.build(rep, "recall_vs_kv")
        self.assertIsNotNone(r)
        with h5py.File(path, "r") as f:
            for label in h5_attr(f["selectors"], "order"):
                kv_b, meta = expected_kv_bytes(f, label)
                d = r.data["selectors"][label]
                np.testing.assert_allclose(d["kv_bytes"], kv_b, rtol=1e-12, err_msg=label)
                np.testing.assert_allclose(d["metadata_bytes"], meta, rtol=1e-12, err_msg=label)
                assert_same(self, d["recall"], f["selectors"][label]["model_mass_recall_mean"][()], label)
        return rep, r

    def test_proxy_selectors(self):
        rep, r = self.check_recall_vs_kv(Fixtures.kvsel)
        d = r.data["selectors"]
        self.assertEqual(set(d), set(rep.selector_order), r.data["skipped"])
        self.assertEqual({k: d[k]["rule"] for k in ("quest", "h2o", "snapkv", "duo", "hysparse")},
                         {"quest": "full", "h2o": "evict", "snapkv": "evict-prompt", "duo": "head-split",
                          "hysparse": "hybrid"})
        # hysparse:window=64 is not the /kv hysparse row (window 128): the formula, said so.
        self.assertTrue(d["hysparse"]["origin"].startswith("formula"), d["hysparse"]["origin"])
        self.assertGreater(float(d["quest"]["metadata_bytes"][0]), 0.0)
        self.assertGreater(float(d["h2o"]["metadata_bytes"][0]), 0.0)
        self.assertIn("quest", r.caption)
        self.assertIn("after the prompt", r.caption)

    def test_sparsity_budgets(self):
        self.check_recall_vs_kv(Fixtures.sparsity)

    def test_kv_report_figure(self):
        for path in (Fixtures.kv, Fixtures.kv2):
            rep = load_report(path)
            self.assertIsNone(figs.build(rep, "recall_vs_kv"))
            r = figs.build(rep, "kv_memory")
            lines = {l.get_gid(): l for l in r.figure.axes[0].get_lines() if l.get_gid()}
            with h5py.File(path, "r") as f:
                methods = h5_strings(f["method"])
                for i, m in enumerate(methods):
                    assert_same(self, lines[f"kv:{m}"].get_ydata(), f["resident_bytes"][i], m)
                    assert_same(self, lines[f"kv:{m}"].get_xdata(), f["context"][()], m)
                    if m != "full":
                        self.assertEqual(r.data["ratio_at_largest"][m], f["ratio_to_full"][i, -1])
                self.assertIn(h5_attr(f, "kv_dtype"), r.caption)
            w, _ = r.figure.get_size_inches()
            self.assertEqual(round(w, 2), figs.SINGLE_COLUMN_IN)

    def test_minimal_kv_table(self):
        """A /kv group with resident_bytes only (no ratio, no attributes): the ratio is full / resident, and the
        Pareto view prices from /capture (bf16) since T is not among the contexts."""
        path = strip_kv_resident(Fixtures.tokens, Fixtures.work / "minimal_kv.h5")
        with h5py.File(path, "r+") as f:
            del f["kv"]
            g = f.create_group("kv")
            g.create_dataset("method", data=np.array(["full", "hysparse"], dtype=h5py.string_dtype()))
            g.create_dataset("context", data=np.array([4096, 32768], dtype=np.int64))
            g.create_dataset("resident_bytes", data=np.array([[400, 3200], [100, 640]], dtype=np.int64))
        rep = load_report(path)
        r = figs.build(rep, "kv_memory")
        self.assertEqual(r.data["ratio_at_largest"]["hysparse"], 3200 / 640)
        p = figs.build(rep, "recall_vs_kv")
        with h5py.File(path, "r") as f:
            for label in rep.selector_order:
                kv_b, meta = expected_kv_bytes_without_kv(f, label)
                np.testing.assert_allclose(p.data["selectors"][label]["kv_bytes"], kv_b, rtol=1e-12, err_msg=label)
                self.assertTrue(p.data["selectors"][label]["origin"].startswith("formula"), label)


def expected_kv_bytes_without_kv(f, label):
    """expected_kv_bytes for a report whose /kv table has no attributes: bf16 K and V from /capture."""
    cap = f["capture"]
    bpt = 2 * int(h5_attr(cap, "num_kv_heads")) * int(h5_attr(cap, "head_dim")) * 2

    class _View:  # the report with bytes_per_token_per_layer as a /kv attribute would have it
        def __init__(self, f):
            self.f = f

        def __getitem__(self, key):
            return _Attrs(bpt) if key == "kv" else self.f[key]

    class _Attrs:
        def __init__(self, v):
            self.attrs = {"bytes_per_token_per_layer": np.int64(v)}

    return expected_kv_bytes(_View(f), label)


class CliTest(unittest.TestCase):
    """python3 -m analysis: files, formats, metadata, summary, exit codes."""

    def check_outputs(self, report: Path, out: Path, expect_figures, expect_skipped=()):
        files = sorted(p.name for p in out.iterdir())
        self.assertFalse([n for n in files if n.startswith(".")], f"temporary files left: {files}")
        with h5py.File(report, "r") as f:
            sha = h5_attr(f, "git_sha")
            created = h5_attr(f, "created_utc")
        for name in expect_figures:
            png, pdf = out / f"{name}.png", out / f"{name}.pdf"
            self.assertTrue(png.is_file() and pdf.is_file(), name)
            w, h, text = png_info(png)
            self.assertIn(w, PAPER_WIDTHS_PX, f"{name}.png width {w}")
            self.assertTrue(300 <= h <= 2400, f"{name}.png height {h}")
            self.assertIn("Comment", text, f"{name}.png metadata: {sorted(text)}")
            meta = json.loads(text["Comment"])
            self.assertEqual(meta["git_sha"], sha)
            self.assertEqual(meta["created_utc"], created)
            self.assertIn(os.path.basename(meta["input_files"][0]), text.get("Source", ""))
            raw = pdf.read_bytes()
            self.assertTrue(raw.startswith(b"%PDF-"), f"{name}.pdf magic")
            self.assertIn(b"%%EOF", raw[-64:], f"{name}.pdf end")
            self.assertIn(sha.encode(), raw, f"{name}.pdf metadata has the git sha")
            box = re.search(rb"/MediaBox \[ *0 0 ([0-9.]+) ([0-9.]+) *\]", raw)
            self.assertIsNotNone(box, f"{name}.pdf has no page box")
            self.assertIn(round(float(box.group(1)) / 72, 2), (figs.SINGLE_COLUMN_IN, figs.DOUBLE_COLUMN_IN),
                          f"{name}.pdf page width {box.group(1)} pt")
            self.assertTrue(1.0 <= float(box.group(2)) / 72 <= 8.0, f"{name}.pdf page height {box.group(2)} pt")
            self.assertGreater(len(raw), 2000)
        for name in expect_skipped:
            self.assertFalse((out / f"{name}.png").exists(), name)
        summary = (out / "summary.md").read_text()
        self.assertIn(sha, summary)
        self.assertIn(created, summary)
        for name in expect_figures:
            self.assertIn(f"]({name}.png)", summary)
            self.assertIn(f"]({name}.pdf)", summary)
        for name in expect_skipped:
            self.assertIn(f"`{name}`: not drawn", summary)
        return summary

    def test_tokens(self):
        out = Fixtures.work / "out_tokens"
        proc = run_cli(Fixtures.tokens, "--out", out)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        summary = self.check_outputs(Fixtures.tokens, out, list(figs.FIGURES))
        rep = load_report(Fixtures.tokens)
        for bi in range(len(rep.budgets)):
            self.assertIn(f"### {rep.budgets.describe(bi)}", summary)
            best = ranked_table(rep, bi)[0]
            self.assertIn(f"| 1 | {best['label']} | {best['model_mass_recall_mean']:.4f} |", summary)

    def test_sparsity_and_options(self):
        out = Fixtures.work / "out_sparsity"
        proc = run_cli(Fixtures.sparsity, "--out", out, "--budget", "s=0.9", "--layer", "3", "--formats", "png,pdf,svg")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.check_outputs(Fixtures.sparsity, out, list(figs.FIGURES))
        svg = (out / "recall_vs_budget.svg").read_text()
        self.assertIn("<svg", svg)
        summary = (out / "summary.md").read_text()
        self.assertIn("layer 3 of each head", summary)
        self.assertIn("at sparsity 0.9", summary)

    def test_lean_report_skips(self):
        out = Fixtures.work / "out_lean"
        proc = run_cli(Fixtures.lean, "--out", out)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.check_outputs(Fixtures.lean, out, ["recall_vs_budget", "layer_heatmap", "hysparse_distance",
                                                "head_boxplot"], ["reuse_matrix", "output_error"])

    def test_kv_report(self):
        """A standalone KV report: only the KV figure, a summary with the KV table; --budget is refused."""
        out = Fixtures.work / "out_kvreport"
        proc = run_cli(Fixtures.kv, "--out", out)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        summary = self.check_outputs(Fixtures.kv, out, ["kv_memory"])
        # The replay figures do not apply (and are not listed as "not drawn").
        self.assertEqual(sorted(p.name for p in out.iterdir()), ["kv_memory.pdf", "kv_memory.png", "summary.md"])
        self.assertIn("# hysparse KV report: kv.h5", summary)
        self.assertIn("## KV accounting", summary)
        with h5py.File(Fixtures.kv, "r") as f:
            last = f["resident_bytes"][2, -1]
            self.assertIn(f"| hysparse | {int(f['context'][-1])} | {summary_bytes(last)} |", summary)
        self.assertNotIn("not drawn", summary)
        proc = run_cli(Fixtures.kv, "--out", out, "--budget", "256")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertIn("does not apply to a KV-accounting report", proc.stderr)

    def test_kv_selector_table(self):
        out = Fixtures.work / "out_kvsel"
        proc = run_cli(Fixtures.kvsel, "--out", out)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        summary = self.check_outputs(Fixtures.kvsel, out, ["recall_vs_kv", "kv_memory"], ["output_error"])
        self.assertIn("## KV bytes per selector", summary)
        with h5py.File(Fixtures.kvsel, "r") as f:
            if "kv_resident_bytes" in f["selectors/h2o"]:
                total = f["selectors/h2o/kv_resident_bytes"][0]
                self.assertIn("`/selectors/h2o/kv_resident_bytes`", summary)
            else:
                kv_b, meta = expected_kv_bytes(f, "h2o")
                total = kv_b[0] + meta[0]
                self.assertIn("fallback: formula", summary)
            r = f["selectors/h2o/model_mass_recall_mean"][()]
        self.assertIn(f"{summary_bytes(total)} (R {r[0]:.3f})", summary)

    def test_bad_options(self):
        out = Fixtures.work / "out_bad"
        for args, needle in ((("--budget", "100"), "budget '100' is not in the report"),
                             (("--layer", "99"), "layer 99 is not in the report"),
                             (("--formats", "gif"), "--formats")):
            proc = run_cli(Fixtures.tokens, "--out", out, *args)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            self.assertIn(needle, proc.stderr)


class BadInputTest(unittest.TestCase):
    """Files that are not readable reports: ReportError with one clear line; exit code 2."""

    def expect_error(self, path: Path, *needles: str) -> None:
        with self.assertRaises(ReportError) as ctx:
            load_report(path)
        msg = str(ctx.exception)
        self.assertEqual(len(msg.splitlines()), 1, msg)
        self.assertTrue(msg.startswith(str(path) + ": "), msg)
        self.assertIn("expected", msg)
        for n in needles:
            self.assertIn(n, msg)
        proc = run_cli(path, "--out", Fixtures.work / "out_error")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(proc.stderr.strip().splitlines(), [f"analysis: {msg}"])
        self.assertEqual(proc.stdout, "")

    def test_text_file(self):
        p = Fixtures.work / "notes.txt"
        p.write_text("not a report\n")
        self.expect_error(p, "not an HDF5 file", "hysparse-report")

    def test_missing_file(self):
        self.expect_error(Fixtures.work / "does-not-exist.h5", "no such file")

    def test_non_report_hdf5(self):
        p = Fixtures.work / "other.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("x", data=np.arange(3))
        self.expect_error(p, "no root attribute 'format'", "format='hysparse-report'")

    def test_other_format(self):
        p = Fixtures.work / "other_format.h5"
        with h5py.File(p, "w") as f:
            f.attrs["format"] = "netcdf-thing"
            f.attrs["format_version"] = 1
        self.expect_error(p, "format is 'netcdf-thing'",
                          "format='hysparse-report', 'hysparse-sweep' or 'hysparse-kv-report'")

    def test_kv_report_unknown_version(self):
        p = Fixtures.work / "kv_v2.h5"
        shutil.copy(Fixtures.kv, p)
        with h5py.File(p, "r+") as f:
            f.attrs["format_version"] = np.int64(2)
        self.expect_error(p, "format_version 2 is not supported", "expected format_version 1")

    def test_kv_report_without_table(self):
        p = Fixtures.work / "kv_empty.h5"
        with h5py.File(Fixtures.kv, "r") as src, h5py.File(p, "w") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
        self.expect_error(p, "missing dataset 'method'", "hysparse-kv-report")

    def test_capture_is_not_a_report(self):
        self.expect_error(Fixtures.capture, "hysparse capture, not a report")

    def test_unknown_format_version(self):
        p = Fixtures.work / "v2.h5"
        shutil.copy(Fixtures.tokens, p)
        with h5py.File(p, "r+") as f:
            f.attrs["format_version"] = np.int64(2)
        self.expect_error(p, "format_version 2 is not supported", "expected format_version 1")

    def test_missing_dataset(self):
        p = Fixtures.work / "broken.h5"
        shutil.copy(Fixtures.tokens, p)
        with h5py.File(p, "r+") as f:
            del f["selectors/swa/layer_mass_recall_p10"]
        self.expect_error(p, "missing dataset '/selectors/swa/layer_mass_recall_p10'")

    def test_wrong_shape(self):
        p = Fixtures.work / "badshape.h5"
        shutil.copy(Fixtures.tokens, p)
        with h5py.File(p, "r+") as f:
            del f["selectors/oracle/model_mass_recall_mean"]
            f["selectors/oracle"].create_dataset("model_mass_recall_mean", data=np.zeros(7))
        self.expect_error(p, "/selectors/oracle/model_mass_recall_mean", "shape (7,)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hysparse", required=True, help="path to the hysparse binary")
    ap.add_argument("--workdir", default=None, help="directory for fixtures and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the fixtures and outputs")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    start = time.time()
    workdir = args.workdir or tempfile.gettempdir()
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for case in (LoaderTest, KvReportLoaderTest, FigureDataTest, KvFigureTest, CliTest, BadInputTest):
        suite.addTests(loader.loadTestsFromTestCase(case))
    try:
        Fixtures.build(args.hysparse, workdir)
    except Exception as e:  # noqa: BLE001 - every test needs the fixtures
        print(f"cannot make the test reports: {e}", file=sys.stderr)
        print(f"0 passed, {suite.countTestCases()} failed")
        return 1
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
