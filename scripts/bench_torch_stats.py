#!/usr/bin/env python3
"""A straightforward PyTorch implementation of the block-statistics pass, timed on the GPU.

Per KV group (query heads sharing one key head) and chunk of query rows: scores
S = scale * q k^T (bf16 inputs, fp32 output from torch.bmm(..., out_dtype=float32)), the causal
mask, then per key block of `--block` keys (a reshape) the max logit m and sum exp(S - m), and the
row log-sum-exp: the statistics hysparse's CUDA pass computes, in the same units (score elements
per second over the causal elements, G * T (T + 1) / 2 per group).

Two variants per length: `chunked` (query rows in chunks of --chunk-rows, so memory stays bounded)
and `unchunked` (the whole T x T score matrix of a group at once, the naive version); a variant
that runs out of GPU memory is reported as OOM. With --ours-log (the output of hysparse_bench_cuda
from the same machine), prints our rate next to PyTorch's and the ratio.

  python3 scripts/bench_torch_stats.py [--seq-lens 8192,32768,131072] [--ours-log bench_cuda.log]
"""
import argparse
import math
import re
import sys

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="8192,32768,131072")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--chunk-rows", type=int, default=4096, help="query rows per chunk (the CUDA backend's tile)")
    p.add_argument("--groups", type=int, default=1, help="KV groups timed (the rate is per element, so one suffices)")
    p.add_argument("--ours-log", help="hysparse_bench_cuda output to compare with (RESULT lines)")
    p.add_argument("--seed", type=int, default=20261128)
    return p.parse_args()


def scores_fp32(q, k):
    """[G, R, d] x [K, d] -> [G, R, K] fp32 from bf16 operands (fp32 accumulation)."""
    kt = k.t().unsqueeze(0).expand(q.shape[0], -1, -1)
    try:
        return torch.bmm(q, kt, out_dtype=torch.float32)
    except TypeError:  # PyTorch without out_dtype: the same products, upcast, TF32 off
        return torch.bmm(q.float(), kt.float())


def block_statistics(q, k, row0, row1, block, scale):
    """Statistics of query rows [row0, row1) of a group: (block max, block sum, row lse)."""
    groups, rows, _ = q.shape
    keys = row1  # the chunk's last row sees keys 0..row1-1
    num_blocks = (keys + block - 1) // block
    s = scores_fp32(q, k[:keys]) * scale
    s = torch.nn.functional.pad(s, (0, num_blocks * block - keys), value=-math.inf)
    positions = torch.arange(row0, row1, device=q.device)
    columns = torch.arange(num_blocks * block, device=q.device)
    s.masked_fill_(columns[None, None, :] > positions[None, :, None], -math.inf)
    blocks = s.view(groups, rows, num_blocks, block)
    m = blocks.amax(dim=-1)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty blocks: sum 0
    l = torch.exp(blocks - shift[..., None]).sum(dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    return m, l, lse


def one_pass(q, k, block, scale, chunk_rows):
    T = k.shape[0]
    out = None
    for row0 in range(0, T, chunk_rows):
        row1 = min(T, row0 + chunk_rows)
        out = block_statistics(q[:, row0:row1], k, row0, row1, block, scale)
    return out


def self_check(device, block, generator):
    """Against a float64 reference on a small input: block masses agree to fp32 rounding."""
    G, T, d = 4, 300, 64
    q = torch.randn(G, T, d, device=device, generator=generator).to(torch.bfloat16)
    k = torch.randn(T, d, device=device, generator=generator).to(torch.bfloat16)
    scale = 1 / math.sqrt(d)
    m, l, lse = block_statistics(q, k, 0, T, block, scale)
    z = (q.double() @ k.double().t()) * scale
    z = z.masked_fill(torch.arange(T, device=device)[None, :] > torch.arange(T, device=device)[:, None], -math.inf)
    lse_ref = torch.logsumexp(z, dim=-1)
    nb = (T + block - 1) // block
    zp = torch.nn.functional.pad(z, (0, nb * block - T), value=-math.inf).view(G, T, nb, block)
    mass_ref = torch.exp(zp - lse_ref[..., None, None]).sum(-1)
    mass = l.double() * torch.exp(m.double() - lse.double()[..., None])
    mass = torch.nan_to_num(mass, nan=0.0)
    err = ((mass - mass_ref).abs() / mass_ref.clamp_min(1e-300)).masked_fill(mass_ref == 0, 0).max().item()
    return err


def main():
    a = parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: PyTorch sees no CUDA device")
        return 0
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device=device).manual_seed(a.seed)
    print(f"device: {torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}, seed {a.seed}")
    print(f"self-check vs float64 (block masses, T=300): largest relative error {self_check(device, a.block, generator):.2e}")
    G = a.q_heads // a.kv_heads
    ours = {}
    if a.ours_log:
        for line in open(a.ours_log):
            match = re.match(r"RESULT kind=(\S+)(?: precision=(\S+))?(?: T=(\d+))? elements_per_s=(\S+)", line)
            if match:
                ours[(match.group(1), match.group(2), int(match.group(3)) if match.group(3) else None)] = float(match.group(4))
    print(f"shape: {G} query heads per KV group, head_dim {a.head_dim}, block {a.block}, {a.groups} group(s) timed, all causal rows")
    print(f"{'T':>8} {'variant':>10} {'rows/chunk':>10} {'seconds':>9} {'elements/s':>11} {'peak GiB':>9}"
          f" {'ours bf16':>11} {'ours/torch':>10}")
    scale = 1 / math.sqrt(a.head_dim)
    for T in [int(x) for x in a.seq_lens.split(",")]:
        elements = a.groups * G * T * (T + 1) / 2
        for variant, chunk_rows in (("chunked", a.chunk_rows), ("unchunked", T)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                q = torch.randn(a.groups, G, T, a.head_dim, device=device, generator=generator).to(torch.bfloat16)
                k = torch.randn(a.groups, T, a.head_dim, device=device, generator=generator).to(torch.bfloat16)
                one_pass(q[0][:, : min(T, chunk_rows)], k[0][: min(T, chunk_rows)], a.block, scale, chunk_rows)  # warm-up
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for g in range(a.groups):
                    one_pass(q[g], k[g], a.block, scale, chunk_rows)
                stop.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(stop) / 1e3
                rate = elements / seconds
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                ours_rate = ours.get(("pass", "bf16", T))
                ratio = f"{ours_rate / rate:10.1f}" if ours_rate else f"{'-':>10}"
                ours_text = f"{ours_rate:11.3e}" if ours_rate else f"{'-':>11}"
                print(f"{T:>8} {variant:>10} {chunk_rows:>10} {seconds:9.3f} {rate:11.3e} {peak:9.1f} {ours_text} {ratio}")
                print(f"RESULT kind=torch variant={variant} T={T} elements_per_s={rate:.6e}")
            except torch.cuda.OutOfMemoryError:
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                print(f"{T:>8} {variant:>10} {chunk_rows:>10} {'OOM':>9} {'-':>11} {peak:9.1f}   (out of GPU memory)")
                print(f"RESULT kind=torch variant={variant} T={T} oom=1")
            finally:
                q = k = None
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
