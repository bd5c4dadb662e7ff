"""The `spidr-fast extract` run: shard, skip what is done, decode in threads, extract, write in threads.

Order of work: inputs of this rank are probed (header durations, in threads), sorted longest
first, decoded by `num_workers` threads ahead of the model (bounded prefetch), batched by the
`FeatureExtractor` under its sample budget, and written by two writer threads, so decoding and
writing overlap the forward passes. A file that fails (decoding, checks, writing) is recorded
and the run goes on; `failures.jsonl` (`failures.rank{r}.jsonl` under several ranks) lists them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spidr_fast.data.audio import AudioError
from spidr_fast.extraction.extractor import DTYPES, FeatureExtractor
from spidr_fast.extraction.files import (
    Input,
    is_complete,
    list_inputs,
    output_paths,
    probe_seconds,
    read_audio,
    remove_stale_temps,
    save_outputs,
    shard,
    write_failures,
)
from spidr_fast.extraction.unit_outputs import dedup_result, write_units_jsonl

RELEASED = ("spidr_base", "dinosr_base_reproduced", "dinosr_base_original")


def load_checkpoint(spec: str) -> torch.nn.Module:
    """A released model by name (fetched through the torch hub cache) or a checkpoint path."""
    import spidr_fast

    if spec in RELEASED:
        return getattr(spidr_fast, spec)()
    return spidr_fast.load_model(spec)


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment torchrun sets; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def _decoded(
    items: list[Input], args: argparse.Namespace, failures: list[tuple[str, str]], on_fail: callable
) -> Iterator[tuple[Input, np.ndarray]]:
    """(item, waveform) in `items` order, decoded by a thread pool a bounded number of files ahead."""

    def decode(item: Input) -> np.ndarray:
        return read_audio(item, resample=args.resample, downmix=args.downmix)

    with ThreadPoolExecutor(max(1, args.num_workers), thread_name_prefix="decode") as pool:
        ahead: deque[tuple[Input, Future]] = deque()
        todo = iter(items)
        for item in todo:
            ahead.append((item, pool.submit(decode, item)))
            if len(ahead) >= 4 * max(1, args.num_workers):
                break
        while ahead:
            item, future = ahead.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append((nxt, pool.submit(decode, nxt)))
            try:
                yield item, future.result()
            except AudioError as exc:
                failures.append((item.name, exc.reason))
                on_fail(item)
            except Exception as exc:
                failures.append((item.name, f"{type(exc).__name__}: {exc}"))
                on_fail(item)


def run(args: argparse.Namespace) -> int:
    """Extract every input of this rank; returns the exit status (1 when any file failed)."""
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = rank_and_world()
    out_dir = Path(args.output_dir)
    layers = [] if args.units_only else (args.layer or [6])
    unit_names = (["probs"] if args.units == "codebook-probs" else ["units"]) if args.units else []
    names = [f"layer{n}" for n in sorted(set(layers))] + unit_names
    if not names:
        raise SystemExit("spidr-fast extract: --units-only needs --units")
    dedup, jsonl = getattr(args, "dedup", False), getattr(args, "units_format", "files") == "jsonl"
    if (dedup or jsonl) and unit_names != ["units"]:
        raise SystemExit("spidr-fast extract: --dedup and --units-format jsonl need --units (discrete units)")
    names += ["durations"] if dedup else []
    everything = list_inputs(args.input)
    if not everything:
        print(f"spidr-fast extract: warning: no audio files found in {args.input}", file=sys.stderr)
    inputs = shard(everything, rank, world)
    paths = {i.key: output_paths(out_dir, i.key, names, args.format) for i in inputs}
    remove_stale_temps([p for ps in paths.values() for p in ps.values()])
    with ThreadPoolExecutor(max(1, args.num_workers)) as pool:
        complete = list(pool.map(lambda i: is_complete(paths[i.key], names), inputs))
        todo = [i for i, done in zip(inputs, complete) if not done]
        seconds = dict(zip((i.key for i in todo), pool.map(probe_seconds, todo)))
    todo.sort(key=lambda i: -seconds[i.key])  # longest first: batches of similar lengths, OOM shows early
    failures: list[tuple[str, str]] = []
    written = 0
    if todo:
        device = args.device or default_device()
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        extractor = FeatureExtractor(
            load_checkpoint(args.checkpoint),
            layers=layers,
            units=args.units,
            units_layer=args.units_layer,
            device=device,
            dtype=dtype,
            compile=args.compile,
            max_batch_seconds=args.max_batch_seconds,
            chunk_seconds=args.chunk_seconds,
            overlap_seconds=args.overlap_seconds,
            before_residual=not args.after_residual,
        )
        save_dtype = DTYPES[args.save_dtype]
        bar = tqdm(
            total=sum(seconds.values()),
            unit="audio-s",
            unit_scale=False,
            desc=f"extract{f' rank {rank}/{world}' if world > 1 else ''}",
            disable=args.no_progress,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]",
        )

        def advance(item: Input) -> None:
            bar.update(seconds[item.key])

        writes: deque[tuple[Input, Future]] = deque()

        def settle(limit: int) -> None:
            nonlocal written
            while len(writes) > limit:
                item, future = writes.popleft()
                try:
                    future.result()
                    written += 1
                except Exception as exc:
                    failures.append((item.name, f"could not write the output ({type(exc).__name__}: {exc})"))

        with ThreadPoolExecutor(2, thread_name_prefix="write") as writer:
            for item, result in extractor.stream(_decoded(todo, args, failures, advance), presorted=True):
                result = dedup_result(result) if dedup else result
                writes.append((item, writer.submit(save_outputs, result, paths[item.key], save_dtype)))
                advance(item)
                settle(16)
            settle(0)
        bar.close()
    if jsonl:
        write_units_jsonl(out_dir / ("units.jsonl" if world == 1 else f"units.rank{rank}.jsonl"), inputs, paths, names)
    failures_file = out_dir / ("failures.jsonl" if world == 1 else f"failures.rank{rank}.jsonl")
    write_failures(failures_file, sorted(failures))
    _summary(rank, world, written, len(inputs) - len(todo), failures, sum(seconds.values()), start, failures_file)
    return 1 if failures else 0


def _summary(
    rank: int,
    world: int,
    written: int,
    skipped: int,
    failures: list[tuple[str, str]],
    audio_seconds: float,
    start: float,
    failures_file: Path,
) -> None:
    wall = time.perf_counter() - start
    who = f"rank {rank}/{world}: " if world > 1 else ""
    lines = [
        f"spidr-fast extract: {who}{written} written, {skipped} already complete (skipped), {len(failures)} failed",
        f"  {audio_seconds / 3600:.3f} h of audio in {wall:.1f} s ({audio_seconds / max(wall, 1e-9):.1f} audio-s/s)",
    ]
    if failures:
        lines.append(f"  failures ({failures_file}):")
        lines += [f"    {path}: {reason}" for path, reason in sorted(failures)[:20]]
        if len(failures) > 20:
            lines.append(f"    ... and {len(failures) - 20} more")
    print("\n".join(lines), file=sys.stderr)
