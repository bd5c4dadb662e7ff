"""Feature and unit extraction: the `FeatureExtractor` API and the `spidr-fast extract` pipeline."""

from spidr_fast.extraction.extractor import FeatureExtractor, plan_pieces

__all__ = ["FeatureExtractor", "plan_pieces"]
