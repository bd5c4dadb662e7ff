"""One padded batch, forward + backward, through every attention backend, against masked SDPA in fp32.

For each backend of `spidr_fast.kernels.attention` (forced with SPIDR_FAST_ATTENTION), q/k/v of a
padded batch (base shapes: 12 heads of 64, utterances of different lengths) go forward and
backward in `--dtype`; outputs and input gradients on the real frames are compared with the
masked-SDPA reference computed in fp32 from the same inputs (relative Frobenius error), and the
forward + backward is timed (median of `--repeats`). A backend that cannot run here (flash-attn
not installed, no CUDA) is reported with the reason; one that raises is reported with the error.

    python bench/attention_backends.py --out attention.jsonl            # CUDA, bf16
    python bench/attention_backends.py --smoke --out attention.jsonl    # CPU, fp32, tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, environment, synchronize

from spidr_fast.kernels import attention as attn


def padded_inputs(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    seq = max(lengths)
    q, k, v = (torch.randn(len(lengths), heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    mask = torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return [t.requires_grad_() for t in (q, k, v)], mask


def run_backend(backend: str, q, k, v, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """(output, gradients, the backend that ran). FlashAttention-4 runs forward-only calls (no dropout,
    no gradient: spidr_fast uses it for the teacher and extraction), so it is timed forward only."""
    os.environ["SPIDR_FAST_ATTENTION"] = backend
    backward = backend != "flash_attn_4"
    try:
        padding = attn.Padding.from_mask(mask)
        with torch.set_grad_enabled(backward):
            ran = attn.select_backend(padding, q, 0.0)
            out = attn.self_attention(q, k, v, padding, dropout_p=0.0)
        real = mask[:, None, :, None]
        grads = torch.autograd.grad((out * real).float().square().sum(), (q, k, v)) if backward else ()
    finally:
        os.environ.pop("SPIDR_FAST_ATTENTION", None)
    return out, list(grads), ran


def rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask[:, None, :, None].expand_as(b)
    a, b = a.float()[real], b.float()[real]
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def why_not(backend: str, device: torch.device) -> str | None:
    if backend != "masked" and device.type != "cuda":
        return "needs CUDA"
    if backend == "flash_attn" and attn._flash_attn_varlen() is None:
        return "flash-attn is not installed (carry its wheel: bench/README.md)"
    if backend == "flash_attn_4" and attn._flash_attn_4_varlen() is None:
        return "flash-attn-4 (flash_attn.cute) is not installed (carry its wheel: bench/README.md)"
    if backend == "flash_attn_4" and attn._compute_capability(device) < (9, 0):
        return "FlashAttention-4 needs Hopper (sm_90) or newer"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bf16 on CUDA"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 737, 512, 301, 64, 999, 800, 250])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append to")
    parser.add_argument("--smoke", action="store_true", help="tiny, fp32, CPU-friendly")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    heads, head_dim = 12, 64
    if args.smoke:
        args.lengths, args.repeats, heads, head_dim = [13, 7, 10], 2, 2, 8
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    (q, k, v), mask = padded_inputs(args.lengths, heads, head_dim, dtype, device)
    q64, k64, v64 = (
        t.detach().to(torch.float32 if device.type == "cuda" else torch.float64).requires_grad_() for t in (q, k, v)
    )
    ref_out = attn.self_attention_ref(q64, k64, v64, attn.Padding(mask))
    ref_grads = torch.autograd.grad((ref_out * mask[:, None, :, None]).square().sum(), (q64, k64, v64))
    env = environment(device)
    records = []
    for backend in attn.BACKENDS:
        record: dict[str, Any] = {"benchmark": "attention_backend", "backend": backend, "dtype": str(dtype)[6:]}
        record.update(lengths=args.lengths, heads=heads, head_dim=head_dim, **env)
        reason = why_not(backend, device)
        if reason:
            record.update(status="skipped", reason=reason)
        else:
            try:
                out, grads, ran = run_backend(backend, q, k, v, mask)
                record["ran"] = ran  # a backend that cannot take these inputs (fp32 for flash) falls back
                record["out_rel_err"] = rel_err(out, ref_out, mask)
                if grads:
                    record["grad_rel_err"] = max(rel_err(g, r, mask) for g, r in zip(grads, ref_grads))
                times = []
                for _ in range(args.repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    run_backend(backend, q, k, v, mask)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                key = "fwd_bwd_ms" if grads else "fwd_ms"
                record.update(status="ok", **{key: statistics.median(times) * 1e3})
            except Exception as e:
                missing = isinstance(e, ImportError) or "pip install" in str(e) or "not installed" in str(e)
                record.update(status="skipped" if missing else "error", reason=f"{type(e).__name__}: {e}"[:500])
                traceback.print_exc()
        records.append(record)
        keys = ("backend", "ran", "status", "out_rel_err", "grad_rel_err", "fwd_bwd_ms", "fwd_ms", "reason")
        print({k: record.get(k) for k in keys})
    append_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
