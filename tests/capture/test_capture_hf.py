#!/usr/bin/env python3
"""Tests of the transformers capture path (scripts/capture_hf.py): PyTorch + transformers, CPU or GPU.

Run from the repository root, with a Python that has torch, transformers, h5py and numpy:

    python3 tests/capture/test_capture_hf.py --hysparse build/src/cli/hysparse --models ../shared/models \
        --workdir /tmp/capture-hf-tests [--device cpu|cuda]

Where torch or transformers cannot be imported it prints SKIPPED and "0 passed, 0 failed, 1 skipped", exit 0.

1. The real model TinyStories-656K (Hugging Face format, loaded offline from --models/TinyStories-656K, or
   --models naming that folder itself; read in place, never copied): greedy tokens from BOS equal the golden ids of its README; the command-line capture is
   valid for `hysparse inspect`; the probabilities recomputed from the captured q/k equal the model's own
   eager attention probabilities (output_attentions, in this test only); the capture equals the NumPy
   path's (scripts/capture_llama.py) within float tolerance; replaying full attention gives recall 1;
   the NumPy path's tokenizer matches the `tokenizers` library.
2. Small random-weight configs of Llama (default and llama3 RoPE), Mistral (sliding window), Qwen2
   (sliding layers, q/k/v bias), Qwen3 (q/k norms), Gemma, Gemma 2 (own softmax scale, sliding layers),
   Gemma 3 (text; sliding pattern, q/k norms) and gpt-oss (attention sinks): the same probability check
   for every layer and head, layer types and window as declared by the config, recall 1 at full attention
   in the replay, and for the Llama-like families the NumPy path on the saved weights agrees with
   transformers. Families the installed transformers lacks are reported as skipped.
3. Clear errors: Gemma 2 with logit soft-capping, a bidirectional Gemma 3, and a model without attention
   layers (Mamba) fail with a message; no file is left behind.

The last line printed is "N passed, M failed" (", K skipped" when some were skipped); exit 0 unless one failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

GOLDEN_656K = [int(x) for x in """147 201 282 215 286 598 1662 356 499 826 1363 1145 1652 615 242 1482 951 628 499 826
872 921 318 385 628 499 826 617 242 198 1047 425 1939 122 1924 1171 94 303 328 229""".split()]
T_REAL = 256
T_RANDOM = 64
PROB_TOL = 2e-5      # max |p_capture - p_eager| in float32
QKV_TOL = 1e-4       # max |x_numpy - x_transformers| / max|x|


class Env:
    hysparse = ""
    models = Path(".")
    work = Path(".")
    device = "cpu"
    results: dict = {}   # name -> measured numbers, printed at the end


def run(cmd, timeout=600, check=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def probs_from_capture(path, layer):
    """Dense probabilities [Hq, T, T] recomputed from a capture's q/k (float64), with the layer's window
    and sinks as the capture declares them."""
    import h5py
    import numpy as np
    import capture_format as cf

    with h5py.File(path, "r") as f:
        a = f.attrs
        scale = float(a["softmax_scale"]) if "softmax_scale" in a else 1 / np.sqrt(int(a["head_dim"]))
        types = [str(t) for t in a["layer_types"]] if "layer_types" in a else None
        window = int(a["sliding_window"]) if types and types[layer] == "sliding_attention" else None
        g = f[f"layers/{layer}"]
        q, k = cf.read_tensor(g["q"]).astype(np.float64), cf.read_tensor(g["k"]).astype(np.float64)
        sinks = cf.read_tensor(g["sink_logits"]).astype(np.float64) if "sink_logits" in g else None
    Hq, T, _ = q.shape
    s = np.einsum("hnd,hsd->hns", q, np.repeat(k, Hq // k.shape[0], axis=0)) * scale
    i, j = np.indices((T, T))
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, sinks[:, None, None])
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(sinks[:, None, None] - m)
    return e / den


def eager_probs(model_dir_or_model, tokens, device, config=None):
    """The model's own eager attention probabilities (output_attentions=True), one array per layer."""
    import torch
    import transformers

    if isinstance(model_dir_or_model, (str, Path)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir_or_model), dtype=torch.float32,
                                                                  attn_implementation="eager",
                                                                  local_files_only=True)
    else:
        model = model_dir_or_model
    model.to(device).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(tokens)], device=device), output_attentions=True, use_cache=False)
    return [a[0].double().cpu().numpy() for a in out.attentions]


def max_prob_error(capture, reference):
    import numpy as np

    worst = 0.0
    for layer, ref in enumerate(reference):
        got = probs_from_capture(capture, layer)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def replay_full_recall(capture, T):
    """Model mass recall of the oracle, SWA and HySparse when the budget covers every key."""
    import h5py

    report = str(capture) + ".report.h5"
    with h5py.File(capture, "r") as f:
        layers = int(f.attrs["num_layers"])
    block = 16
    run([Env.hysparse, "replay", capture, "-o", report, "--budget", f"{block},{T}", "--block", str(block),
         "--selectors", f"oracle,swa,hysparse:block={block}", "--schedule", "F" + "S" * (layers - 1),
         "--reuse-budget", "0", "--threads", "2", "-q"])
    with h5py.File(report, "r") as f:
        budgets = f["axes/budget"][...].tolist()
        full = budgets.index(T)
        return {s: float(f["selectors"][s]["model_mass_recall_mean"][full]) for s in f["selectors"]}


def compare_captures(a, b):
    """max |a - b| / max |b| over q, k, v of every layer (the two captures must have the same shape)."""
    import h5py
    import numpy as np
    import capture_format as cf

    worst = 0.0
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa["tokens"][...].tolist() == fb["tokens"][...].tolist()
        for layer in range(int(fb.attrs["num_layers"])):
            for n in ("q", "k", "v"):
                x, y = cf.read_tensor(fa[f"layers/{layer}/{n}"]), cf.read_tensor(fb[f"layers/{layer}/{n}"])
                assert x.shape == y.shape, (n, x.shape, y.shape)
                worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    return worst


# --------------------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------------------


class TinyStories656K(unittest.TestCase):
    folder = None
    capture = None

    @classmethod
    def setUpClass(cls):
        cls.folder = Env.models / "TinyStories-656K"
        if not cls.folder.is_dir() and (Env.models / "model.safetensors").is_file():
            cls.folder = Env.models  # --models may name the TinyStories-656K folder itself
        if not (cls.folder / "model.safetensors").is_file():
            return
        cls.capture = Env.work / "ts656k_hf.h5"
        t0 = time.time()
        run([sys.executable, SCRIPTS / "capture_hf.py", cls.folder, "-o", cls.capture, "--offline", "--seq-len",
             str(T_REAL), "--device", Env.device, "--torch-dtype", "float32"])
        Env.results["TinyStories-656K capture_hf.py (load + 255 greedy steps + capture)"] = f"{time.time() - t0:.1f} s"

    def setUp(self):
        if not (self.folder / "model.safetensors").is_file():
            self.skipTest(f"SKIPPED: {self.folder} not found (pass --models)")

    def test_golden_greedy_tokens(self):
        import h5py

        with h5py.File(self.capture, "r") as f:
            tokens = f["tokens"][...].tolist()
            text = f["text"].asstr()[()]
        self.assertEqual(tokens[0], 1)
        self.assertEqual(tokens[1:41], GOLDEN_656K)
        self.assertTrue(text.startswith("Once upon a time, there was a little girl named Lily."), text[:80])
        self.assertIn("valid hysparse capture", run([Env.hysparse, "inspect", self.capture]).stdout)

    def test_probabilities_match_eager_attention(self):
        import h5py

        with h5py.File(self.capture, "r") as f:
            tokens = f["tokens"][...].tolist()
        err = max_prob_error(self.capture, eager_probs(self.folder, tokens, Env.device))
        Env.results["TinyStories-656K max |p_capture - p_eager| (2 layers x 8 heads x 256 x 256)"] = f"{err:.2e}"
        self.assertLess(err, PROB_TOL)

    def test_numpy_path_agrees(self):
        import h5py

        with h5py.File(self.capture, "r") as f:
            ids = " ".join(map(str, f["tokens"][...].tolist()))
        out = Env.work / "ts656k_numpy.h5"
        run([sys.executable, SCRIPTS / "capture_llama.py", self.folder, "-o", out, "--tokens", ids, "--no-bos"])
        err = compare_captures(out, self.capture)
        Env.results["TinyStories-656K NumPy vs transformers capture, max rel |dq|,|dk|,|dv|"] = f"{err:.2e}"
        self.assertLess(err, QKV_TOL)

    def test_layer_subset_bfloat16_from_token_ids(self):
        import h5py
        import numpy as np
        import capture_format as cf

        with h5py.File(self.capture, "r") as f:
            ids = f["tokens"][1:65].tolist()
        out = Env.work / "ts656k_sub.h5"
        run([sys.executable, SCRIPTS / "capture_hf.py", self.folder, "-o", out, "--offline", "--device", Env.device,
             "--torch-dtype", "float32", "--tokens", ",".join(map(str, ids)), "--layers", "1", "--dtype", "bfloat16",
             "--no-v"])
        with h5py.File(out, "r") as f, h5py.File(self.capture, "r") as full:
            self.assertEqual(int(f.attrs["num_layers"]), 1)
            self.assertEqual(f.attrs["source_layers"].tolist(), [1])
            self.assertEqual(f["tokens"][...].tolist(), full["tokens"][:65].tolist())
            self.assertNotIn("v", f["layers/0"])
            self.assertEqual(f["layers/0/q"].attrs["dtype"], "bfloat16")
            for n in ("q", "k"):
                np.testing.assert_allclose(cf.read_tensor(f[f"layers/0/{n}"]),
                                           cf.read_tensor(full[f"layers/1/{n}"])[:, :65], rtol=2 ** -8, atol=1e-5)
        self.assertIn("valid hysparse capture", run([Env.hysparse, "inspect", out]).stdout)

    def test_replay_full_attention_recall_one(self):
        for sel, r in replay_full_recall(self.capture, T_REAL).items():
            self.assertAlmostEqual(r, 1.0, places=6, msg=sel)

    def test_numpy_tokenizer_matches_tokenizers_library(self):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            self.skipTest("SKIPPED: tokenizers not installed")
        import capture_llama as cl

        cfg, _ = cl.load_model(str(self.folder))
        mine = cl.load_tokenizer(str(self.folder), cfg, None)
        ref = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        for text in ("Once upon a time, there was a little girl named Lily.", "  two  spaces\nnewline",
                     "héllo wörld 你好", "The dog said: \"Woof!\" 123 times; then... ok?"):
            self.assertEqual(mine.encode(text), ref.encode(text, add_special_tokens=False).ids, text)


# --------------------------------------------------------------------------------------------------------
# Random-weight families
# --------------------------------------------------------------------------------------------------------

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def family_configs():
    """name -> (config class name, kwargs, expected layer types or None, NumPy path comparable)."""
    sw = dict(sliding_window=16)
    alt = ["sliding_attention", "full_attention"] * 2
    return {
        "llama": ("LlamaConfig", dict(COMMON), ["full_attention"] * 4, True),
        "llama-rope-llama3": ("LlamaConfig", dict(COMMON, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)), ["full_attention"] * 4, True),
        "mistral": ("MistralConfig", dict(COMMON, **sw), ["sliding_attention"] * 4, True),
        "qwen2": ("Qwen2Config", dict(COMMON, use_sliding_window=True, max_window_layers=2, **sw),
                  ["full_attention"] * 2 + ["sliding_attention"] * 2, True),
        "qwen3": ("Qwen3Config", dict(COMMON), ["full_attention"] * 4, True),
        "gemma": ("GemmaConfig", dict(COMMON), ["full_attention"] * 4, False),
        "gemma2": ("Gemma2Config", dict(COMMON, attn_logit_softcapping=None, final_logit_softcapping=None,
                                        query_pre_attn_scalar=32, layer_types=alt, **sw), alt, False),
        "gemma3": ("Gemma3TextConfig", dict(COMMON, query_pre_attn_scalar=24, layer_types=alt, **sw), alt, False),
        "gpt_oss": ("GptOssConfig", dict(COMMON, num_local_experts=4, num_experts_per_tok=2, layer_types=alt, **sw),
                    alt, False),
    }


def make_model(cls_name, kwargs, attn="eager"):
    import torch
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise unittest.SkipTest(f"SKIPPED: transformers {transformers.__version__} has no {cls_name}")
    config = cls(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():  # peakier attention than the default init, so that errors would show
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-1.0, 2.0, p.numel()))
    return model.eval()


class Families(unittest.TestCase):
    def _family(self, name):
        import h5py
        import numpy as np
        import torch
        import capture_hf as ch

        cls_name, kwargs, expect_types, numpy_ok = family_configs()[name]
        folder = Env.work / f"random-{name}"
        model = make_model(cls_name, kwargs)
        model.save_pretrained(folder)
        rng = np.random.default_rng(1)
        tokens = [1] + rng.integers(3, 128, T_RANDOM - 1).tolist()
        reference = eager_probs(model, tokens, Env.device)

        import transformers
        capture_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                          local_files_only=True).to(Env.device).eval()
        base = ch.install(capture_model)
        out = Env.work / f"random-{name}.h5"
        ch.capture_model(capture_model, tokens, str(out), model_name=name, source="test")
        err = max_prob_error(out, reference)
        with h5py.File(out, "r") as f:
            types = [str(t) for t in f.attrs["layer_types"]]
            window = int(f.attrs["sliding_window"]) if "sliding_window" in f.attrs else None
            sinks = "sink_logits" in f["layers/0"]
            scale = float(f.attrs["softmax_scale"])
        line = f"max |dp| {err:.2e} (base {base}), scale {scale:.4g}, types {''.join(t[0].upper() for t in types)}"
        self.assertEqual(types, expect_types)
        self.assertEqual(window, 16 if "sliding_attention" in types else None)
        self.assertEqual(sinks, name == "gpt_oss")
        self.assertLess(err, PROB_TOL)
        # eager as the base gives the same capture
        ch.install(capture_model, "eager")
        out_eager = Env.work / f"random-{name}-eager.h5"
        ch.capture_model(capture_model, tokens, str(out_eager), model_name=name, source="test")
        d = compare_captures(out_eager, out)
        self.assertLess(d, 1e-5)
        recall = replay_full_recall(out, T_RANDOM)
        for sel, r in recall.items():
            self.assertAlmostEqual(r, 1.0, places=6, msg=sel)
        if numpy_ok:
            numpy_out = Env.work / f"random-{name}-numpy.h5"
            run([sys.executable, SCRIPTS / "capture_llama.py", folder, "-o", numpy_out, "--no-bos",
                 "--tokens", " ".join(map(str, tokens))])
            d = compare_captures(numpy_out, out)
            line += f", NumPy path rel |dx| {d:.2e}"
            self.assertLess(d, QKV_TOL)
        Env.results[f"random {name}"] = line


def _add_family_tests():
    for name in family_configs():
        def test(self, name=name):
            self._family(name)
        test.__name__ = f"test_{name.replace('-', '_')}"
        test.__doc__ = f"random-weight {name}: capture vs eager probabilities, layer types, replay recall 1"
        setattr(Families, test.__name__, test)


_add_family_tests()


class Errors(unittest.TestCase):
    def _expect_error(self, model, message, name):
        import capture_format as cf
        import capture_hf as ch

        out = Env.work / f"error-{name}.h5"
        with self.assertRaises(cf.CaptureError) as ctx:
            ch.install(model)
            ch.capture_model(model, [1] + list(range(3, 3 + T_RANDOM - 1)), str(out), model_name=name, source="t")
        self.assertIn(message, str(ctx.exception))
        self.assertFalse(out.exists())
        self.assertFalse(Path(str(out) + ".partial").exists())
        Env.results[f"error {name}"] = str(ctx.exception)[:110] + "..."

    def test_gemma2_softcapping_is_refused(self):
        kw = dict(family_configs()["gemma2"][1], attn_logit_softcapping=50.0)
        self._expect_error(make_model("Gemma2Config", kw).to(Env.device), "soft-capping", "gemma2-softcap")

    def test_bidirectional_gemma3_is_refused(self):
        kw = dict(family_configs()["gemma3"][1], use_bidirectional_attention=True)
        try:
            model = make_model("Gemma3TextConfig", kw)
        except TypeError as e:
            self.skipTest(f"SKIPPED: Gemma3TextConfig has no use_bidirectional_attention ({e})")
        self._expect_error(model.to(Env.device), "attention mask", "gemma3-bidirectional")

    def test_model_without_attention_is_refused(self):
        kw = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8)
        try:
            model = make_model("MambaConfig", kw, attn=None)
        except unittest.SkipTest:
            raise
        except Exception as e:  # noqa: BLE001
            self.skipTest(f"SKIPPED: cannot build a Mamba model here ({type(e).__name__}: {e})")
        import capture_format as cf
        import capture_hf as ch

        with self.assertRaises(cf.CaptureError) as ctx:
            ch.install(model.to(Env.device))
            ch.capture_model(model, list(range(1, 33)), str(Env.work / "mamba.h5"), model_name="mamba", source="t")
        msg = str(ctx.exception)
        self.assertTrue("never called the attention interface" in msg or "num_hidden_layers" in msg
                        or "AttentionInterface" in msg, msg)
        Env.results["error mamba"] = msg[:110] + "..."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hysparse", default=str(REPO / "build" / "src" / "cli" / "hysparse"))
    ap.add_argument("--models", default=str(REPO.parent / "shared" / "models"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    try:
        import h5py  # noqa: F401
        import numpy  # noqa: F401
        import torch
        import transformers
        from transformers import AttentionInterface  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED: PyTorch / transformers / h5py not importable here ({e})")
        print("0 passed, 0 failed, 1 skipped")
        return 0
    Env.hysparse = str(Path(args.hysparse).resolve())
    if not os.access(Env.hysparse, os.X_OK):
        print(f"hysparse binary not found at {Env.hysparse} (pass --hysparse)")
        print("0 passed, 1 failed")
        return 1
    Env.models = Path(args.models).resolve()
    Env.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    Env.work = Path(tempfile.mkdtemp(prefix="capture-hf-", dir=args.workdir))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name(0) if Env.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {Env.device} ({device_name})")
    t0 = time.time()
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for case in (TinyStories656K, Families, Errors):
        suite.addTests(loader.loadTestsFromTestCase(case))
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("\nmeasured:")
    for k, v in Env.results.items():
        print(f"  {k}: {v}")
    print(f"  total {time.time() - t0:.1f} s")
    if not args.keep and failed == 0:
        shutil.rmtree(Env.work, ignore_errors=True)
    else:
        print(f"work folder kept: {Env.work}")
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
