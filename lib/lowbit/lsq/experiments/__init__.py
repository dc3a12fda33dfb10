"""What notebook 06 calls: cached LSQ/nuLSQ QAT runs and their tables (:mod:`.runs`) and figures
(:mod:`.plots`). Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural
Network Quantization*, ACCV 2024, comparison to LSQ (Esser et al., ICLR 2020)."""
from .runs import (accuracy_table, cached_run, difference_to_lsq, learned_steps, mean_entropy,  # noqa: F401
                   nonuniformity, qat_experiment, run_config, sweep)
