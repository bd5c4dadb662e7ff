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
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spidr_fast.config import DTYPES, SAMPLE_RATE
from spidr_fast.data.audio import AudioError
from spidr_fast.extraction.extractor import FeatureExtractor
from spidr_fast.extraction.files import (
    Input,
    flat_inputs,
    is_complete,
    list_inputs,
    output_paths,
    probe_seconds,
    read_audio,
    remove_stale_temps,
    save_outputs,
    shard,
    split_shared_keys,
)
from spidr_fast.extraction.settings import (
    SETTINGS_FILE,
    SettingsConflict,
    checkpoint_identity,
    conflict_message,
    differences,
    file_sha256,
    merged,
    output_names,
    read_settings,
    write_settings,
)
from spidr_fast.extraction.unit_outputs import dedup_result, merge_units_jsonl, rank_units_jsonl, write_units_jsonl
from spidr_fast.io import write_failures

RELEASED = ("spidr_base", "dinosr_base_reproduced", "dinosr_base_original")


def load_checkpoint(spec: str, config: Path | None = None) -> torch.nn.Module:
    """A released model by name (fetched through the torch hub cache) or a checkpoint path (+ its config)."""
    import spidr_fast

    if spec in RELEASED:
        if config is not None:
            raise ValueError(f"--config is for checkpoint files: {spec} comes with its own config")
        return getattr(spidr_fast, spec)()
    return spidr_fast.load_model(spec, config=None if config is None else spidr_fast.read_model_config(config))


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment torchrun sets; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    """Wait for every rank (torchrun's environment; gloo: no GPU needed). Ranks finish their shares at
    different times, hence the long timeout; torchrun stops the others when one fails."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        return
    dist.init_process_group("gloo", timeout=timedelta(hours=24))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


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


def _settings(args: argparse.Namespace, layers: list[int], units_layer: int | None, dtype: str) -> dict:
    """What decides the outputs (see `spidr_fast.extraction.settings`)."""
    import spidr_fast

    return {
        "checkpoint": checkpoint_identity(args.checkpoint, RELEASED, args.config),
        "layers": layers,
        "units": args.units,
        **({"kmeans_sha256": file_sha256(Path(args.units.removeprefix("kmeans:")))} if _is_kmeans(args.units) else {}),
        "dedup": bool(getattr(args, "dedup", False)),
        **({"flat": True} if getattr(args, "flat", False) else {}),
        "units_layer": units_layer,
        "features": "layer output (after residual)" if args.after_residual else "FFN output (before residual)",
        "dtype": dtype,
        "save_dtype": args.save_dtype,
        "format": args.format,
        "chunk_seconds": args.chunk_seconds,
        "overlap_seconds": args.overlap_seconds,
        "resample": args.resample,
        "downmix": args.downmix,
        "spidr_fast_version": spidr_fast.__version__,
    }


def _is_kmeans(units: str | None) -> bool:
    return bool(units) and units.startswith("kmeans:")


def _recorded_settings(out_dir: Path, settings: dict, overwrite: bool) -> dict | None:
    """The folder's settings record (None: none); one that differs from `settings` is refused unless `overwrite`."""
    try:
        old = read_settings(out_dir)
    except SettingsConflict:
        if overwrite:
            return None
        raise
    if old is not None and not overwrite and (lines := differences(old, settings)):
        raise SettingsConflict(conflict_message(out_dir, lines))
    return old


def _delete_outputs(out_dir: Path, records: list[dict], inputs: list[Input]) -> None:
    """--overwrite: delete the outputs of `inputs` under each settings record's names and format."""
    for record in records:
        names = output_names(record.get("layers") or [], record.get("units"), dedup=bool(record.get("dedup")))
        for item in inputs:
            for path in output_paths(out_dir, item.key, names, record.get("format", "npy")).values():
                path.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """Extract every input of this rank; returns the exit status (1 when any file failed)."""
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = rank_and_world()
    out_dir = Path(args.output_dir)
    if args.units_only and not args.units:
        raise ValueError("--units-only needs --units (heads or codebooks)")
    feature_layers = sorted(set(args.layer or [6]))
    layers = [] if args.units_only else feature_layers
    # Units are for --units-layer, else the deepest --layer (6 by default), with or without --units-only.
    units_layer = (args.units_layer or max(feature_layers)) if args.units else None
    dedup, jsonl = getattr(args, "dedup", False), getattr(args, "units_format", "files") == "jsonl"
    if (dedup or jsonl) and args.units not in ("heads", "codebooks") and not _is_kmeans(args.units):
        raise ValueError(
            "--dedup and --units-format jsonl need discrete units (--units heads, codebooks or kmeans:PATH)"
        )
    names = output_names(layers, args.units, dedup=dedup)
    device = args.device or default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    everything = list_inputs(args.input)
    if not everything:
        print(f"spidr-fast extract: warning: no audio files found in {args.input}", file=sys.stderr)
    # Files whose outputs would overwrite each other (clip.wav, clip.ogg -> clip) fail; the others go on.
    if getattr(args, "flat", False):  # outputs named by file id alone; sharding by that name keeps twins together
        everything = flat_inputs(everything)
    inputs, failures = split_shared_keys(shard(everything, rank, world))
    paths = {i.key: output_paths(out_dir, i.key, names, args.format) for i in inputs}
    remove_stale_temps([p for ps in paths.values() for p in ps.values()])
    with ThreadPoolExecutor(max(1, args.num_workers)) as pool:
        settings = _settings(args, layers, units_layer, dtype)
        recorded = _recorded_settings(out_dir, settings, args.overwrite)
        if args.overwrite:
            complete = [False] * len(inputs)
        else:
            complete = list(pool.map(lambda i: is_complete(paths[i.key], names), inputs))
        if recorded is None and any(complete):
            raise SettingsConflict(
                f"{out_dir} holds {sum(complete)} complete outputs but no {SETTINGS_FILE}: their settings are "
                "unknown (written by hand or by an older spidr_fast). Write to another folder, or pass --overwrite "
                "to recompute them."
            )
        todo = [i for i, done in zip(inputs, complete) if not done]
        seconds = dict(zip((i.key for i in todo), pool.map(probe_seconds, todo)))
    todo.sort(key=lambda i: -seconds[i.key])  # longest first: batches of similar lengths, OOM shows early
    silent: list[str] = []
    written, extracted_seconds = 0, 0.0
    if todo:
        extractor = FeatureExtractor(
            load_checkpoint(args.checkpoint, args.config),
            layers=layers,
            units=args.units,
            units_layer=units_layer,
            device=device,
            dtype=dtype,
            compile=args.compile,
            max_batch_seconds=args.max_batch_seconds,
            chunk_seconds=args.chunk_seconds,
            overlap_seconds=args.overlap_seconds,
            before_residual=not args.after_residual,
        )
    # The folder changes only now that the model is loaded: a run that fails before leaves it as it was.
    if args.overwrite:
        _delete_outputs(out_dir, [settings, *([recorded] if recorded else [])], inputs)
    write_settings(out_dir, merged(None if args.overwrite else recorded, settings))  # before any output
    if todo:
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

        decoded_seconds: dict[str, float] = {}

        def checked(stream: Iterator[tuple[Input, np.ndarray]]) -> Iterator[tuple[Input, np.ndarray]]:
            """Note each file's decoded duration, and the silent ones (written, but worth a warning)."""
            for item, wave in stream:
                decoded_seconds[item.key] = wave.shape[0] / SAMPLE_RATE
                if wave.min() == wave.max():
                    silent.append(item.name)
                yield item, wave

        writes: deque[tuple[Input, Future]] = deque()

        def settle(limit: int) -> None:
            nonlocal written, extracted_seconds
            while len(writes) > limit:
                item, future = writes.popleft()
                try:
                    future.result()
                    written += 1
                    extracted_seconds += decoded_seconds.pop(item.key)
                except Exception as exc:
                    failures.append((item.name, f"could not write the output ({type(exc).__name__}: {exc})"))

        with ThreadPoolExecutor(2, thread_name_prefix="write") as writer:
            stream = checked(_decoded(todo, args, failures, advance))
            for item, result in extractor.stream(stream, presorted=True):
                result = dedup_result(result) if dedup else result
                writes.append((item, writer.submit(save_outputs, result, paths[item.key], save_dtype)))
                advance(item)
                settle(16)
            settle(0)
        bar.close()
    if jsonl:
        share = out_dir / "units.jsonl" if world == 1 else rank_units_jsonl(out_dir, rank)
        write_units_jsonl(share, inputs, paths, names)
        if world > 1:
            _barrier()  # every rank's share written
            if rank == 0:
                merge_units_jsonl(out_dir, world, split_shared_keys(everything)[0])
    failures_file = out_dir / ("failures.jsonl" if world == 1 else f"failures.rank{rank}.jsonl")
    write_failures(failures_file, sorted(failures))
    skipped = len(inputs) - len(todo)
    _summary(rank, world, written, skipped, failures, sorted(silent), extracted_seconds, start, failures_file)
    return 1 if failures else 0


def _summary(
    rank: int,
    world: int,
    written: int,
    skipped: int,
    failures: list[tuple[str, str]],
    silent: list[str],
    audio_seconds: float,
    start: float,
    failures_file: Path,
) -> None:
    wall = time.perf_counter() - start
    who = f"rank {rank}/{world}: " if world > 1 else ""
    lines = [
        f"spidr-fast extract: {who}{written} written, {skipped} already complete (skipped), {len(failures)} failed",
        f"  {audio_seconds:.1f} s of audio ({audio_seconds / 3600:.3f} h) extracted in {wall:.1f} s "
        f"({audio_seconds / max(wall, 1e-9):.1f} audio-s/s)",
    ]
    if silent:
        lines.append(f"  warning: {len(silent)} silent file(s) (every sample equal), written as features of silence:")
        lines += [f"    {path}" for path in silent[:20]]
        if len(silent) > 20:
            lines.append(f"    ... and {len(silent) - 20} more")
    if failures:
        lines.append(f"  failures ({failures_file}):")
        lines += [f"    {path}: {reason}" for path, reason in sorted(failures)[:20]]
        if len(failures) > 20:
            lines.append(f"    ... and {len(failures) - 20} more")
    print("\n".join(lines), file=sys.stderr)
