"""What notebooks 01, 03 and 04 call (notebook 02's study is :mod:`lowbit.sq.convergence`).

:mod:`.universal_sets` (notebook 01: SQ Table 1, supplement Table 2), :mod:`.ptq_tables`
(notebook 03: SQ Tables 2-3, supplement Table 2's final optimisation), :mod:`.hardware`
(notebook 04: Fig. 4's integer network checked end to end).
"""
from .ptq_tables import ROWS, PTQStudy, cached_run, degradation_cell, run_ptq  # noqa: F401
