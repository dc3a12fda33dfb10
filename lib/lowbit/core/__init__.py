"""Paper-agnostic core: argument validation, the nearest-point quantizer of a QPS (SQ eq. 3),
the round-to-nearest uniform grid and clipping thresholds (MSE / ACIQ / KL).

Imports nothing else from lowbit: every other package builds on it.
"""
from .clipping import CLIP_RULES, aciq_coefficient, baseline_threshold, kl_threshold, mse_threshold  # noqa: F401
from .points import point_index, quantize_rows, quantize_to_points, quantize_to_points_reference  # noqa: F401
from .uniform import round_to_grid, uniform_levels, uniform_points, uniform_step  # noqa: F401
from .validation import as_points, as_weights, check_bits, check_choice, check_tol, resolve_device  # noqa: F401
