"""Q-Rater: Kim, Lee et al., *Q-Rater: Non-Convex Optimization for Post-Training Uniform Quantization*."""
from .run_all import *  # noqa: F401,F403
from .run_all import _best, _check_bits, _kl_threshold, _mse_threshold, _mse_threshold_reference, _rtn  # noqa: F401
