"""Start-point math: StyleSSP's frequency manipulation of the inverted latent."""

from .frequency import FILTER_TYPES, RANGE_MODES, frequency_mask, frequency_start_point

__all__ = ["FILTER_TYPES", "RANGE_MODES", "frequency_mask", "frequency_start_point"]
