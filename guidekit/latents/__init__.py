"""Start-point methods: StyleSSP's frequency manipulation of the inverted latent, and its sampler hook."""

from .frequency import FILTER_TYPES, RANGE_MODES, frequency_mask, frequency_start_point
from .stylessp import StyleSSP

__all__ = ["FILTER_TYPES", "RANGE_MODES", "StyleSSP", "frequency_mask", "frequency_start_point"]
