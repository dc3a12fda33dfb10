"""Across the four papers (notebook 08): every method on the same networks and bit widths, against
the MAC it needs (:mod:`.cost`) and the compute it cost, from the cached runs of notebooks 03-07
(:mod:`.points`).

Builds on SQ (Oh, Sim, Kim, Lee, ECCV 2022), Q-Rater (Kim et al., arXiv:2105.01868), nuLSQ
(Gongyo et al., ACCV 2024) and ALQ/STLQ (Oh, Sim, Lee, Lee, CVPR 2021): an experiments-layer
package, the one place that reads more than one paper's results.
"""
from .cost import mac_gates, relative_mac_cost, term_sets  # noqa: F401
from .points import (COLUMNS, cross_paper_rows, front_lines, lsq_rows, pareto_front, peer_rows, qrater_rows,  # noqa: F401
                     sq_rows, stlq_rows, table_rows)
from .peer_runs import cached_peer, iteration_rows, run_grid, run_peer  # noqa: F401
from . import plots  # noqa: F401
