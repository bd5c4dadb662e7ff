"""Data pipeline: manifests, checked decoding, bucketed or packed batches, span masks, a synthetic corpus.

Modules (imported on demand, so `spidr-fast manifest` does not load torch):
- `manifest`: .csv / .tsv / .jsonl / tar manifests and the `spidr-fast manifest` command;
- `audio`: `load_audio` (soundfile decode + checks + standardisation; PCM16 as int16 + statistics with
  `integer=True`, standardised on the device by `standardize_on_device`) and `AudioError`;
- `dataset`: `SpeechDataset` over a manifest, with `skip_bad`;
- `batching`: `BucketBatchSampler` (cropped or packed, split across ranks), `Collator`, `Batch`;
- `masks`: `compute_mask_indices`, `compute_packed_mask_indices` (C++ `spidr_fast._C` or NumPy);
- `corpus`: `generate_corpus`, a formant-synthesised corpus with 10 ms phone alignments.
"""
