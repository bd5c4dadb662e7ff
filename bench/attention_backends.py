"""Attention, timed once per gpu-check: every padded and every dense backend, each checked against fp32 SDPA.

Padded: for each backend of `spidr_fast.kernels.attention` (forced with SPIDR_FAST_ATTENTION), q/k/v
of a padded batch (base shapes: 12 heads of 64, utterances of different lengths) go forward and
backward in `--dtype`; outputs and input gradients on the real frames are compared with the
masked-SDPA reference computed in fp32 from the same inputs (relative Frobenius error), and the
forward + backward is timed (median of `--repeats`).

Dense (nothing padded: the training case, every utterance of a batch cropped to one length): each
dense backend (`attention.DENSE_BACKENDS`, run alone: an SDPA backend without SDPA's fallbacks) on
a base-shaped batch (16 x 12 heads x ~750 frames x 64, q, k, v the model's strided views of one qkv
projection) in three modes: "train" (dropout 0.1, forward
+ backward: the student), "fwd+bwd" (dropout 0) and "fwd" (dropout 0, no gradient: the teacher and
extraction, where the forward-only FlashAttention-3/4 compete). Errors against fp32 SDPA are taken
at dropout 0 (dropout draws differ between kernels). Per mode, an `attention_dense_choice` record
names the fastest backend beside the one `attention.DENSE_ORDER` chooses on this device: where they
differ, the table's row for this compute capability should change.

A backend that cannot run here (not installed, no CUDA, the wrong GPU) is reported with the reason;
one that raises is reported with the error.

    python bench/attention_backends.py --out attention.jsonl            # CUDA, bf16
    python bench/attention_backends.py --smoke --out attention.jsonl    # CPU, fp32, tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, environ, environment, synchronize

from spidr_fast.kernels import attention as attn


def padded_inputs(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    seq = max(lengths)
    q, k, v = (torch.randn(len(lengths), heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    mask = torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return [t.requires_grad_() for t in (q, k, v)], mask


def run_backend(backend: str, q, k, v, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """(output, gradients, the backend that ran). FlashAttention-4 runs forward-only calls (no dropout,
    no gradient: spidr_fast uses it for the teacher and extraction), so it is timed forward only."""
    backward = backend != "flash_attn_4"
    with environ(SPIDR_FAST_ATTENTION=backend):
        padding = attn.Padding.from_mask(mask)
        with torch.set_grad_enabled(backward):
            ran = attn.select_backend(padding, q, 0.0)
            out = attn.self_attention(q, k, v, padding, dropout_p=0.0)
        real = mask[:, None, :, None]
        grads = torch.autograd.grad((out * real).float().square().sum(), (q, k, v)) if backward else ()
    return out, list(grads), ran


def rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Relative Frobenius error of `a` against `b` (on the real frames of `mask`, when given)."""
    a, b = a.float(), b.float()
    if mask is not None:
        real = mask[:, None, :, None].expand_as(b)
        a, b = a[real], b[real]
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


DENSE_MODES = {"train": (0.1, True), "fwd+bwd": (0.0, True), "fwd": (0.0, False)}  # mode: (dropout, backward)


def why_not_dense(backend: str, device: torch.device, dropout_p: float, backward: bool) -> str | None:
    if backend in attn.FORWARD_ONLY and (dropout_p or backward):
        return "forward only, no dropout (spidr_fast calls it for the teacher and extraction)"
    if backend == "sdpa_flash" and device.type == "cpu" and dropout_p:
        return "SDPA's CPU flash kernel has no dropout"
    if backend not in ("sdpa", "sdpa_flash") and device.type != "cuda":
        return "needs CUDA"
    if device.type == "cuda" and not attn._dense_installed(backend, attn._compute_capability(device)):
        return f"{backend} is not installed or not built for this GPU (carry its wheel: bench/README.md)"
    return None


def run_dense(backend: str, qkv: torch.Tensor, dropout_p: float, grad_out: torch.Tensor | None):
    """(output, the gradient of the (B, T, 3, H, Dh) `qkv` for `grad_out`, None without it) of dense backend
    `backend`, run alone on q, k, v laid out as the model's attention hands them over (views of one qkv
    projection, permuted to (B, H, T, Dh): not contiguous)."""
    with torch.set_grad_enabled(grad_out is not None):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = attn.dense_attention(q, k, v, dropout_p, backend, strict=True)
    grad = torch.autograd.grad(out, qkv, grad_out)[0] if grad_out is not None else None
    return out, grad


def dense_records(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, env: dict) -> list[dict]:
    """Every dense backend in every mode, then per mode the fastest beside the default table's choice."""
    batch, heads, frames, head_dim = args.dense_shape
    torch.manual_seed(0)
    qkv = torch.randn(batch, frames, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    ref_dtype = torch.float32 if device.type == "cuda" else torch.float64
    grad_out = torch.randn(batch, heads, frames, head_dim, device=device, dtype=dtype)
    ref_out, ref_grad = run_dense("sdpa", qkv.detach().to(ref_dtype).requires_grad_(), 0.0, grad_out.to(ref_dtype))
    flops = 4 * batch * heads * frames * frames * head_dim
    records = []
    with environ(SPIDR_FAST_DENSE_ATTENTION=None):  # the table's own choice
        for mode, (dropout_p, backward) in DENSE_MODES.items():
            default = attn.choose_dense_backend(device, dtype, dropout_p, backward)
            timed: dict[str, float] = {}
            for backend in attn.DENSE_BACKENDS:
                record: dict[str, Any] = {"benchmark": "attention_dense", "backend": backend, "mode": mode}
                record.update(dropout=dropout_p, dtype=str(dtype)[6:], shape=args.dense_shape, default=default, **env)
                reason = why_not_dense(backend, device, dropout_p, backward)
                if reason:
                    record.update(status="skipped", reason=reason)
                    records.append(record)
                    continue
                try:
                    dout = grad_out if backward else None
                    out, grad = run_dense(backend, qkv, 0.0, dout)  # errors at dropout 0
                    record["out_rel_err"] = rel_err(out, ref_out)
                    if grad is not None:
                        record["grad_rel_err"] = rel_err(grad, ref_grad)
                    times = []
                    for _ in range(args.repeats):
                        synchronize(device)
                        start = time.perf_counter()
                        run_dense(backend, qkv, dropout_p, dout)
                        synchronize(device)
                        times.append(time.perf_counter() - start)
                    ms = statistics.median(times) * 1e3
                    timed[backend] = ms
                    tflops = flops * (3.5 if backward else 1.0) / (ms / 1e3) / 1e12
                    record.update(status="ok", ms=ms, tflops=tflops)
                except Exception as e:
                    missing = isinstance(e, ImportError) or "pip install" in str(e)
                    record.update(status="skipped" if missing else "error", reason=f"{type(e).__name__}: {e}"[:500])
                    traceback.print_exc()
                records.append(record)
                keys = ("backend", "mode", "status", "out_rel_err", "grad_rel_err", "ms", "reason")
                print({key: record.get(key) for key in keys})
            records.append(dense_choice(mode, dropout_p, default, timed, device, env))
            print(records[-1]["summary"])
    return records


def dense_choice(
    mode: str, dropout_p: float, default: str, timed: dict[str, float], device: torch.device, env: dict
) -> dict[str, Any]:
    """The fastest dense backend of `mode` beside the default table's choice (what to change it to)."""
    record: dict[str, Any] = {"benchmark": "attention_dense_choice", "mode": mode, "dropout": dropout_p, **env}
    record.update(default=default, default_ms=timed.get(default))
    if device.type == "cuda":
        record["capability"] = "sm_{}{}".format(*attn._compute_capability(device))
    if not timed:
        return record | {"summary": f"{mode}: no dense backend ran"}
    fastest = min(timed, key=timed.__getitem__)
    record.update(fastest=fastest, fastest_ms=timed[fastest])
    if device.type != "cuda":
        verdict = "CPU: DENSE_ORDER is for CUDA devices (these timings check the harness only)"
    elif record["default_ms"] is None:
        verdict = f"the default {default} did not run here"
    elif fastest == default:
        verdict = "the default table's choice is the fastest"
    else:
        gain = record["default_ms"] / timed[fastest]
        record["default_over_fastest"] = gain
        row = record["capability"]
        verdict = f"{fastest} is {gain:.2f}x faster than the default {default}: change DENSE_ORDER's row for {row}"
    record["summary"] = f"{mode} (dropout {dropout_p:g}): fastest {fastest} ({timed[fastest]:.3f} ms); {verdict}"
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bf16 on CUDA"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 737, 512, 301, 64, 999, 800, 250])
    parser.add_argument(
        "--dense-shape", type=int, nargs=4, default=[16, 12, 750, 64], metavar=("B", "H", "T", "DH"),
        help="the unpadded batch (default: base, 16 x 15 s)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append to")
    parser.add_argument("--smoke", action="store_true", help="tiny, fp32, CPU-friendly")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    heads, head_dim = 12, 64
    if args.smoke:
        args.lengths, args.repeats, heads, head_dim, args.dense_shape = [13, 7, 10], 2, 2, 8, [2, 2, 13, 8]
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
    records += dense_records(args, device, dtype, env)
    append_jsonl(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
