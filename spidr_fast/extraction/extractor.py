"""`FeatureExtractor`: batched, chunked extraction of layer features and discrete units.

Waveforms of any lengths go in, numpy or torch, as decoded: at 16 kHz or any rate given as
`sample_rate=` (resampled as `spidr-fast extract --resample` does), mono or, with `downmix=True`,
multi-channel (channels averaged). They are standardised here, per utterance over the whole
utterance (mean 0, variance 1: what the model expects), so do not standardise them yourself
(harmless, but redundant). Per waveform a dict comes out:
`{"layer6": (frames, D) float32, ..., "units": (frames,) int64}`. Layers are numbered from 1.

How it runs (all of it transparent to the results):
- Utterances longer than `chunk_seconds + 2 * overlap_seconds` are split into pieces of
  `chunk_seconds` of kept frames with `overlap_seconds` of context on each side; the context
  frames are computed and dropped, the kept frames are concatenated (see `plan_pieces`).
  Shorter utterances are one piece, computed whole. Memory is then bounded by the piece size,
  never by the file length, and no (T, T) mask is ever built (padding is a (B, T) key mask).
- Pieces are sorted by length and batched under `max_batch_seconds` of padded audio, with
  `lengths=` padding: on real frames a padded batch equals each piece alone.
- The transformer stops at the deepest layer needed.

Units (`units=`), for `units_layer` (default: the deepest requested layer); they exist only for
the last `num_codebooks` layers (SpidR base: layers 5..12):
- `"heads"`: argmax of the student's prediction head for that layer, what
  `get_codebooks(onehot=True)[layer - 1].argmax(-1)` gives. SpidR: head i reads the FFN output
  (before residual) of layer L - C + i; DinoSR: every head reads the final output.
- `"codebooks"`: nearest codeword (L2, fp32) of the layer's FFN output (before residual)
  instance-normalised over the utterance's frames: the teacher-target recipe, applied to the
  student. For chunked files the normalisation statistics cover the whole file.
- `"codebook-probs"`: the softmax of that head, (frames, K) fp32 posteriors over the codewords,
  returned as "probs" (for KL-based ABX: `spidr-fast abx --name probs --distance kl_symmetric`).
- `"kmeans:PATH"` (or a fitted `spidr_fast.units.KMeans`): nearest centroid of the layer's features
  (FFN output, or the layer output with `before_residual=False`: what `extract` writes and
  `spidr-fast kmeans` fits on), any layer, computed on the device in the same pass.

What was measured (throughput against the reference, accuracy of padding, low precision and
chunking), with the commands: `bench/results/extraction_cpu.md`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from spidr_fast import kernels
from spidr_fast.config import DTYPES, SAMPLE_RATE
from spidr_fast.data.audio import standardize
from spidr_fast.extraction.files import conform
from spidr_fast.extraction.frontend import ChannelsLastFrontend
from spidr_fast.framing import CONV_LAYERS, HOP, RECEPTIVE_FIELD, num_frames
from spidr_fast.kernels.attention import Padding
from spidr_fast.models.padding import masked_instance_norm

UnitsKind = Literal["heads", "codebooks", "codebook-probs"]
_COMPILED_CALLS = threading.Lock()  # see FeatureExtractor._compiled_call
_EXACT_FP32 = threading.Lock()  # see exact_fp32
_exact_fp32_users: list[Callable[[], None]] = []  # one restore per thread inside; the first one's restores


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convs in full fp32 while inside (no TF32 on CUDA: cuBLAS and cuDNN), as the trainer
    runs them (`train.env.setup_torch`); torch's global settings are restored when the last thread inside
    leaves (several threads may extract at once). Ops in bf16/fp16 are unaffected."""
    with _EXACT_FP32:
        _exact_fp32_users.append(_set_exact_fp32() if not _exact_fp32_users else _exact_fp32_users[0])
    try:
        yield
    finally:
        with _EXACT_FP32:
            restore = _exact_fp32_users.pop()
            if not _exact_fp32_users:
                restore()


def _set_exact_fp32() -> Callable[[], None]:
    """Turn TF32 off; returns what puts the settings back. Through the API in use: torch >= 2.9 refuses to
    read its legacy flags once its `fp32_precision` settings chose TF32 (mixing the two is an error)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved = matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()
    except RuntimeError:
        precisions = matmul.fp32_precision, cudnn.conv.fp32_precision
        matmul.fp32_precision = cudnn.conv.fp32_precision = "ieee"

        def restore_precisions() -> None:
            matmul.fp32_precision, cudnn.conv.fp32_precision = precisions

        return restore_precisions
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    def restore_flags() -> None:
        matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])

    return restore_flags


def _mono_16k(key: Any, waveform: np.ndarray | Tensor, sample_rate: int, downmix: bool) -> np.ndarray:
    """One waveform, checked, as float32 (samples,) at 16 kHz: resampled, channels averaged if `downmix`."""
    name = f"waveforms[{key}]" if isinstance(key, int) else str(key)
    x = waveform.detach().to("cpu", torch.float32).numpy() if isinstance(waveform, Tensor) else np.asarray(waveform)
    if x.ndim not in (1, 2):
        raise ValueError(f"{name}: a waveform is 1-D (samples) or 2-D (channels), got shape {x.shape}")
    x = x.reshape(-1, 1) if x.ndim == 1 else (x if x.shape[1] <= x.shape[0] else x.T)  # (samples, channels)
    hints = ("sample_rate=", "downmix=True")
    return conform(x.astype(np.float32, copy=False), sample_rate, name, resample=True, downmix=downmix, hints=hints)


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of an utterance; its frames [keep_from, keep_to) are kept (piece-relative)."""

    start: int
    stop: int
    keep_from: int
    keep_to: int


def plan_pieces(num_samples: int, chunk_frames: int, overlap_frames: int) -> list[Piece]:
    """Split an utterance into pieces of `chunk_frames` kept frames with `overlap_frames` of context each side.

    A piece starts on a frame boundary (a multiple of 320 samples), so its frame j is frame
    start / 320 + j of the whole utterance: the conv front-end gives the same frames as on the whole
    file (extractor_mode="layer_norm"; in "group_norm" mode block 0's statistics cover the piece);
    only attention and the positional conv see less context.
    """
    total = int(num_frames(num_samples))
    if total <= chunk_frames + 2 * overlap_frames:
        return [Piece(0, num_samples, 0, total)]
    pieces = []
    for first in range(0, total, chunk_frames):
        last = min(total, first + chunk_frames)
        lo, hi = max(0, first - overlap_frames), min(total, last + overlap_frames)
        stop = num_samples if hi == total else (hi - 1) * HOP + RECEPTIVE_FIELD
        pieces.append(Piece(lo * HOP, stop, first - lo, last - lo))
    return pieces


@dataclass
class _Pending:
    """An utterance whose pieces are being computed."""

    key: Any
    pieces: list[Piece]
    outputs: list[dict[str, Tensor] | None] = field(default_factory=list)
    done: int = 0


class FeatureExtractor:
    """Extract layer features and/or units from waveforms with a SpidR or DinoSR model.

    Args:
        model: a `spidr_fast.SpidR` / `DinoSR` (put in eval mode and moved to `device`).
        layers: layers whose features to return, numbered from 1 (the reference's extraction
            numbering; 6 is the usual choice). Empty: units only.
        units: None, "heads", "codebooks", "codebook-probs" (returned as "probs"), or k-means:
            "kmeans:PATH" (a file of `KMeans.save`) or a fitted `spidr_fast.units.KMeans` (see the
            module docstring).
        units_layer: layer the units are for; default the deepest of `layers`.
        device: where to run (default: cuda if available, else cpu).
        dtype: "float32" (default), "bfloat16" or "float16" (autocast; units are always assigned in fp32).
        compile: torch.compile the forward; shapes are bucketed (frames rounded up on a fixed
            ladder, batch rows to a power of two) so few graphs are compiled.
        max_batch_seconds: padded audio per forward (default 300 s on GPU, 5 s on CPU).
        chunk_seconds, overlap_seconds: long-utterance chunking (see `plan_pieces`).
        before_residual: features are the FFN output before residual (default, the reference's
            `get_intermediate_outputs`), or the layer output.
        cpu_workers: on the CPU, batches computed at once, each on one intra-op thread (default:
            torch's thread count). Whole batches in parallel scale better than threads inside
            each op; torch's thread count is set to 1 while a call runs and restored after.
            Results do not depend on it.
        channels_last_frontend: run the conv front-end as channels-last GEMMs
            (`extraction.frontend`, faster on the CPU, equal to 1e-6); default: on the CPU in
            layer_norm mode, unless `SPIDR_FAST_BACKEND=reference` or `SPIDR_FAST_REFERENCE_OPS` lists
            `frontend_layout`. It snapshots the conv weights: build the extractor after loading them.

    Calling it on a list of waveforms returns, per waveform, {"layer{l}": (frames, D) float32 on the
    CPU, ..., "units": (frames,) int64}; on one waveform (a 1-D array or tensor), that one dict.
    Waveforms are raw audio: the extractor standardises each itself, resamples it from
    `sample_rate` to 16 kHz, and averages the channels of a 2-D one only with `downmix=True`
    (else refused: a stereo array must not run as one channel of double length). It leaves the
    model untouched (no hooks) and keeps no per-call state, so several threads may call one
    extractor at once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[int] = (6,),
        units: UnitsKind | None = None,
        *,
        units_layer: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        compile: bool = False,
        max_batch_seconds: float | None = None,
        chunk_seconds: float = 60.0,
        overlap_seconds: float = 5.0,
        before_residual: bool = True,
        cpu_workers: int | None = None,
        channels_last_frontend: bool | None = None,
    ) -> None:
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        framing = [(int(k), int(s)) for _, k, s in model.cfg.extractor_conv_layer_config]
        if framing != [(k, s) for _, k, s in CONV_LAYERS]:
            # Chunk planning and output lengths use SpidR's framing (400-sample window, 320 hop).
            raise ValueError(
                f"extraction needs SpidR's conv kernels and strides {[(k, s) for _, k, s in CONV_LAYERS]}, "
                f"the model has {framing}"
            )
        self.model = model.eval().to(self.device)
        num_layers = len(model.student.layers)
        self.layers = sorted({int(layer) for layer in layers})
        for layer in self.layers:
            if not 1 <= layer <= num_layers:
                raise ValueError(f"layer {layer} does not exist: the model has layers 1..{num_layers}")
        self.kmeans = _kmeans_units(units, self.device)
        if self.kmeans is None and units not in (None, "heads", "codebooks", "codebook-probs"):
            raise ValueError(
                f"units must be None, 'heads', 'codebooks', 'codebook-probs', 'kmeans:PATH' or a KMeans, got {units!r}"
            )
        if units is None and not self.layers:
            raise ValueError("nothing to extract: give at least one layer or units")
        self.units = "kmeans" if self.kmeans is not None else units
        self.units_layer = self.units_head = None
        if units is not None:
            if units_layer is None and not self.layers:
                raise ValueError("units without layers: give units_layer, the layer the units are for")
            self.units_layer = int(units_layer if units_layer is not None else max(self.layers))
            first = 1 if self.kmeans is not None else num_layers - model.num_codebooks + 1
            if not first <= self.units_layer <= num_layers:
                raise ValueError(
                    f"units for layer {self.units_layer}: only layers {first}..{num_layers} have a head and codebook"
                    if self.kmeans is None
                    else f"units for layer {self.units_layer}: the model has layers 1..{num_layers}"
                )
            if self.kmeans is not None and self.kmeans.cluster_centers_.shape[1] != model.cfg.encoder_embed_dim:
                raise ValueError(
                    f"the k-means centroids are {self.kmeans.cluster_centers_.shape[1]}-dim, "
                    f"the model's layers {model.cfg.encoder_embed_dim}-dim"
                )
            self.units_head = self.units_layer - first  # index of the head / codebook
        self.is_dinosr_heads = units in ("heads", "codebook-probs") and model.cfg.model_type == "dinosr"
        # Deepest layer the transformer must run: DinoSR heads read the final output.
        self.depth = num_layers if self.is_dinosr_heads else max([*self.layers, self.units_layer or 0])
        # Layers whose outputs a forward keeps: the features' and the units' (DinoSR heads: the last).
        self.kept_layers = {*self.layers, self.depth if self.is_dinosr_heads else self.units_layer} - {None}
        self.before_residual = before_residual
        if max_batch_seconds is None:
            # CPU: batching adds no GEMM efficiency past a few seconds of audio, while small batches
            # pad less and spread evenly over the workers (bench/results/extraction_cpu.md).
            max_batch_seconds = 300.0 if self.device.type == "cuda" else 5.0
        self.max_batch_samples = int(max_batch_seconds * SAMPLE_RATE)
        self.chunk_frames = max(1, round(chunk_seconds * SAMPLE_RATE / HOP))
        self.overlap_frames = max(0, round(overlap_seconds * SAMPLE_RATE / HOP))
        if channels_last_frontend is None:  # the CPU fast path, off in an all-reference run or by frontend_layout
            cpu_layer_norm = self.device.type == "cpu" and model.cfg.extractor_mode == "layer_norm"
            channels_last_frontend = cpu_layer_norm and not kernels._dispatch.reference_requested("frontend_layout")
        self.frontend = ChannelsLastFrontend(model.feature_extractor) if channels_last_frontend else None
        if cpu_workers is not None and cpu_workers < 1:
            raise ValueError(f"cpu_workers must be >= 1, got {cpu_workers}")
        self.workers = 1 if self.device.type != "cpu" else (cpu_workers or torch.get_num_threads())
        self.compiled = compile
        # Only the layers are compiled: the padding (and its packed-attention metadata, a host sync)
        # is built eagerly once per batch, so compiled layers run flash/varlen attention unbroken.
        self._layers = torch.compile(self._layers_impl, dynamic=False) if compile else self._layers_impl
        self._forward = self._forward_impl

    # ---------------------------------------------------------------- public API
    def __call__(
        self,
        waveforms: Sequence[np.ndarray | Tensor] | np.ndarray | Tensor,
        *,
        sample_rate: int = SAMPLE_RATE,
        downmix: bool = False,
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """Extract every waveform (any lengths; results in input order), or one waveform (one dict).

        `waveforms`: a list of 1-D waveforms (or 2-D (samples, channels) / (channels, samples) with
        `downmix=True`), or one such array or tensor. `sample_rate`: their rate, resampled to 16 kHz.
        """
        if isinstance(waveforms, (np.ndarray, Tensor)):
            if waveforms.ndim == 2 and not downmix and min(waveforms.shape) > 1:
                raise ValueError(
                    f"a 2-D waveform of shape {tuple(waveforms.shape)}: pass a list of 1-D waveforms for several "
                    "utterances, or downmix=True to average the channels of one recording"
                )
            return self([waveforms], sample_rate=sample_rate, downmix=downmix)[0]  # type: ignore[return-value]
        results: list[dict[str, Tensor] | None] = [None] * len(waveforms)
        items = enumerate(waveforms)
        for index, result in self.stream(items, presorted=False, sample_rate=sample_rate, downmix=downmix):
            results[index] = result
        return results  # type: ignore[return-value]

    def stream(
        self,
        items: Iterable[tuple[Any, np.ndarray | Tensor]],
        *,
        presorted: bool = True,
        window: int | None = None,
        sample_rate: int = SAMPLE_RATE,
        downmix: bool = False,
    ) -> Iterator[tuple[Any, dict[str, Tensor]]]:
        """Extract (key, waveform) pairs as they come; yields (key, result) as each utterance completes.

        Each waveform is checked and converted as `__call__` describes (`sample_rate`, `downmix`).

        Pieces are queued until they fill `window` batches (default: 4, or twice the CPU workers so
        that every worker has work), then sorted by length and batched (the last, partial batch
        waits for more). With `presorted` (items arrive roughly sorted, e.g. by file size) this
        keeps padding small with bounded memory; `presorted=False` collects every item first and
        sorts globally.
        """
        window = window or max(4, 2 * self.workers)
        budget = math.inf if not presorted else window * self.max_batch_samples
        queue: list[tuple[_Pending, int, Tensor]] = []
        queued = 0
        with self._batch_runner() as submit:
            in_flight: deque[tuple[list[tuple[_Pending, int, Tensor]], Future]] = deque()

            def flush(*, keep_tail: bool, limit: int) -> Iterator[tuple[Any, dict[str, Tensor]]]:
                """Submit the queue's batches, then collect finished ones until `limit` are in flight."""
                batches = self._take_batches(queue, keep_tail=keep_tail)
                alone = not keep_tail and len(batches) == 1 and not in_flight  # nothing to run beside it
                for batch in batches:
                    in_flight.append((batch, submit([b[2] for b in batch], alone=alone)))
                while len(in_flight) > limit:
                    batch, future = in_flight.popleft()
                    yield from self._collect(batch, future.result())

            for key, waveform in items:
                wave = torch.from_numpy(standardize(_mono_16k(key, waveform, sample_rate, downmix)))
                pending = _Pending(key, plan_pieces(wave.numel(), self.chunk_frames, self.overlap_frames))
                pending.outputs = [None] * len(pending.pieces)
                queue.extend((pending, i, wave[p.start : p.stop]) for i, p in enumerate(pending.pieces))
                queued += wave.numel()
                if queued >= budget:
                    # Leave workers - 1 batches computing while more items are read.
                    yield from flush(keep_tail=True, limit=self.workers - 1)
                    queued = sum(q[2].numel() for q in queue)
            yield from flush(keep_tail=False, limit=0)

    # ---------------------------------------------------------------- batching
    def _padded(self, length: int) -> int:
        """Sample count a piece is padded to: itself, or (compiled) the next bucket of the frame ladder."""
        if not self.compiled:
            return length
        frames = int(num_frames(length))
        bucket = 8
        while bucket < frames:
            bucket = math.ceil(bucket * 2**0.25 / 8) * 8  # multiples of 8 frames, ~19% apart
        return (bucket - 1) * HOP + RECEPTIVE_FIELD + HOP - 1  # the widest input giving `bucket` frames

    def _rows(self, count: int) -> int:
        """Rows a batch of `count` pieces takes: itself, or (compiled) the next power of two."""
        return count if not self.compiled else 1 << (count - 1).bit_length()

    def _take_batches(
        self, queue: list[tuple[_Pending, int, Tensor]], *, keep_tail: bool
    ) -> list[list[tuple[_Pending, int, Tensor]]]:
        """Batches from `queue` (longest first); with `keep_tail`, the last partial batch stays queued."""
        queue.sort(key=lambda q: -q[2].numel())
        batches: list[list[tuple[_Pending, int, Tensor]]] = []
        current: list[tuple[_Pending, int, Tensor]] = []
        for entry in queue:
            longest = self._padded(current[0][2].numel() if current else entry[2].numel())
            if current and self._rows(len(current) + 1) * longest > self.max_batch_samples:
                batches.append(current)
                current = []
            current.append(entry)
        if current and not keep_tail:
            batches.append(current)
            current = []
        queue[:] = current
        return batches

    def _collect(
        self, batch: list[tuple[_Pending, int, Tensor]], outputs: list[dict[str, Tensor]]
    ) -> Iterator[tuple[Any, dict[str, Tensor]]]:
        """Store a batch's outputs with their utterances; yield the utterances now complete."""
        for (pending, index, _), out in zip(batch, outputs):
            pending.outputs[index] = out
            pending.done += 1
            if pending.done == len(pending.pieces):
                yield pending.key, self._finish(pending)

    # ---------------------------------------------------------------- compute
    @contextmanager
    def _batch_runner(self) -> Iterator[Callable[..., Future]]:
        """`submit(waves, alone=False) -> Future` for batches.

        One worker: computed inline. CPU workers: on a pool of `workers` threads with one intra-op
        thread each; a batch `alone` (the only work left) is computed inline with all threads.
        """

        def run_now(waves: list[Tensor]) -> Future:
            future: Future = Future()
            future.set_result(self._run_splitting(waves))
            return future

        if self.workers == 1:
            yield lambda waves, alone=False: run_now(waves)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # MKL's and torch's pools are process-wide: one thread per worker

        def submit(waves: list[Tensor], alone: bool = False) -> Future:
            if not alone:
                return pool.submit(self._run_splitting, waves)
            torch.set_num_threads(threads)
            try:
                return run_now(waves)
            finally:
                torch.set_num_threads(1)

        try:
            with ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                yield submit
        finally:
            torch.set_num_threads(threads)

    def _run_splitting(self, waves: list[Tensor]) -> list[dict[str, Tensor]]:
        """`_run_batch`, halving the batch on out-of-memory (a piece alone that does not fit still raises)."""
        try:
            return self._run_batch(waves)
        except torch.OutOfMemoryError:
            if len(waves) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(waves) // 2
            return self._run_splitting(waves[:half]) + self._run_splitting(waves[half:])

    @torch.inference_mode()
    def _run_batch(self, waves: list[Tensor]) -> list[dict[str, Tensor]]:
        """Pad, forward and split: per piece {name: (frames, D)} on the device."""
        lengths = [w.numel() for w in waves]
        width = self._padded(max(lengths))
        rows = self._rows(len(waves))
        batch = torch.zeros(rows, width)
        for i, w in enumerate(waves):
            batch[i, : w.numel()] = w
        sample_lengths = torch.tensor(lengths + [RECEPTIVE_FIELD] * (rows - len(waves)))
        padded = self.compiled or any(n != width for n in lengths)
        batch = batch.to(self.device, non_blocking=True)
        sample_lengths = sample_lengths.to(self.device) if padded else None
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with autocast, self._compiled_call(), exact_fp32():
            outputs = self._forward(batch, sample_lengths)
        return [{name: y[i, : int(num_frames(n))] for name, y in outputs.items()} for i, n in enumerate(lengths)]

    @contextmanager
    def _compiled_call(self) -> Iterator[None]:
        """Around a forward. Compiled: every bucket is its own graph, so dynamo's recompile limit is
        raised (to 64) for the call only; the global setting is dynamo's, never changed for good.
        Compiled calls hold a process-wide lock: the setting is global, so a patch and its restore
        must not interleave with another thread's."""
        if not self.compiled:
            yield
            return
        with _COMPILED_CALLS:
            limit = max(torch._dynamo.config.recompile_limit, 64)
            with torch._dynamo.config.patch(recompile_limit=limit):
                yield

    def _forward_impl(self, waveforms: Tensor, sample_lengths: Tensor | None) -> dict[str, Tensor]:
        """(B, S) standardised waveforms, (B,) real samples or None -> {name: (B, T, D)}.

        The model's own steps, those of `get_intermediate_outputs`: `model.features` (conv stack or
        the channels-last front-end, projection, padding; always eager), then `_layers`.
        """
        features, padding = self.model.features(waveforms, lengths=sample_lengths, conv=self.frontend)
        return self._layers(features, padding)

    def _layers_impl(self, features: Tensor, padding: Padding | None) -> dict[str, Tensor]:
        """The student's `iter_layer_outputs` stopped at `self.depth` (compiled with `compile=True`):
        per layer both its output and its FFN output (features and units may need different ones).
        No state is kept on `self`, so one extractor may serve several threads.
        """
        student = self.model.student
        layers = student.iter_layer_outputs(features, padding, self.depth)
        captured = {n: out for n, out in enumerate(layers, start=1) if n in self.kept_layers}
        outputs = {f"layer{n}": captured[n][1 if self.before_residual else 0] for n in self.layers}
        if self.is_dinosr_heads:
            outputs["units_input"] = student.final_output(captured[self.depth][0])
        elif self.kmeans is not None:  # the layer's features, as `extract` writes them (what k-means was fit on)
            outputs["units_input"] = captured[self.units_layer][1 if self.before_residual else 0]
        elif self.units is not None:
            outputs["units_input"] = captured[self.units_layer][1]
        return outputs

    def _finish(self, pending: _Pending) -> dict[str, Tensor]:
        """Stitch the kept frames of the pieces, compute units over the whole utterance, move to the CPU."""
        joined = {
            name: torch.cat([out[name][p.keep_from : p.keep_to] for p, out in zip(pending.pieces, pending.outputs)])
            for name in pending.outputs[0]
        }
        units_input = joined.pop("units_input", None)
        result = {name: y.float().cpu() for name, y in joined.items()}
        if units_input is not None:
            result["probs" if self.units == "codebook-probs" else "units"] = self.units_of(units_input).cpu()
        return result

    @torch.inference_mode()
    def units_of(self, x: Tensor) -> Tensor:
        """(T, D) units input of one whole utterance -> (T,) int64 ((T, K) fp32 probabilities for
        "codebook-probs"), in fp32 (`exact_fp32`)."""
        with exact_fp32():
            return self._units_of(x.float())

    def _units_of(self, x: Tensor) -> Tensor:
        if self.kmeans is not None:
            return self.kmeans.predict(x)
        c = self.units_head
        if self.units in ("heads", "codebook-probs"):
            head = self.model.heads[c]
            with torch.autocast(x.device.type, enabled=False):
                logits = head(x)
            return logits.softmax(-1) if self.units == "codebook-probs" else logits.argmax(-1)
        codebook, counts = self.model.codebooks.stacked()
        # (1, T, D), statistics over the utterance; the masked form also takes T = 1 (F.instance_norm refuses it).
        target = masked_instance_norm(x.unsqueeze(0), torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device))
        return kernels.codebook_assign(target, codebook[c : c + 1].float(), counts[c : c + 1].float())[0]


def _kmeans_units(units: object, device: torch.device) -> Any:
    """The `spidr_fast.units.KMeans` that `units` names ("kmeans:PATH" or a fitted KMeans), else None."""
    from spidr_fast.units import KMeans

    if isinstance(units, KMeans):
        if units.cluster_centers_ is None:
            raise ValueError("units: the KMeans is not fitted")
        model = KMeans.__new__(KMeans)
        model.__dict__.update(units.__dict__, device=device)  # a copy on the extractor's device
        return model
    if isinstance(units, str) and units.startswith("kmeans:"):
        return KMeans.load(units.removeprefix("kmeans:"), device=device)
    return None
