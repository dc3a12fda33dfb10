"""What notebook 05 calls: cached Q-Rater runs, their tables and claim checks (:mod:`.runs`) and the
figures drawn from them (:mod:`.plots`).

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868, Tables 1-2 and Figs. 5-12, 16-20.
"""
from .runs import (BASELINES, COMBINED, SEARCHED, TABLE1_RESNET20, PAPER_RESNET18_TABLE1, PAPER_RESNET18_TABLE2, TABLE1_VARIANTS, balanced_subset, bias_selection, bo_claims,  # noqa: F401
                   cached_experiment, cached_experiments, claim_lines, experiment, experiment_curve, figure6_runs, figure7_runs,
                   figure8_runs, figure_claims, figure_runs, first_test_images, objective_rows, probe_ties, run_config, sweep, table1_claims, table1_rows,
                   table1_runs, table2_rows)
