"""Subset Quantization (SQ): Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate
Post-Training Quantization*, ECCV 2022 (and its supplementary material).

Universal sets (:mod:`.universal`, sec. 3.2-3.4, Table 1), the optimal scale factor
(:mod:`.scale`, eqs. 8-10), the exhaustive QPS search (:mod:`.search`, Algorithm 1, with its
compiled kernel :mod:`.kernel`), QPS builders and fitted quantizers (:mod:`.quantizers`, eqs.
3-7), the model-level search (:mod:`.model_search`), PTQ (:mod:`.ptq`) with the final
optimisation (:mod:`.refine`), the shift-add hardware (:mod:`.hw`) and what notebooks 01-04 call
(:mod:`.experiments`).
"""
from .ptq import FitCache, PTQConfig, quantize_model, summary  # noqa: F401
from .scale import global_optimal_scale, optimal_scale  # noqa: F401
from .search import search_qps  # noqa: F401
from .universal import qps_count, universal_set  # noqa: F401
