"""STLQ-aware fine-tuning: :func:`finetune`, task loss + ``lam`` * r1 penalty, curves every k iterations.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021,
supplementary material Figs. 1-2: accuracy and NZR recorded along the fine-tuning iterations, with
and without the select tensor, per element and per tile. The training loop is
:func:`lowbit.lsq.train_qat` (SGD + cosine for the weights, Adam for the LSQ activation steps,
seeded, tqdm, checksummed checkpoints, torchrun); the penalty and the selection are
:mod:`lowbit.alq.modules` (**our interpretation**, stated there).

Every record (iteration 0, then every ``record_every`` iterations) holds, on ``curve_set``:
``accuracy`` and ``nzr`` of the model as trained (every non-zero second word in use), and
``deployed`` = ``{select ratio: accuracy}`` with exactly the top-k second words at each of
``deploy_ratios`` (default: the run's own select ratio).
"""
from __future__ import annotations

from ..evaluate import accuracy
from ..lsq.training import train_qat
from .modules import R1Penalty, nzr, prepare_stlq, set_deploy, stlq_weights


class CurveRecorder:
    """The recorder of :func:`finetune`: accuracy and NZR as trained, deployed accuracy per ratio."""

    def __init__(self, curve_set, deploy_ratios):
        self.curve_set, self.deploy_ratios = curve_set, [float(r) for r in deploy_ratios]

    def __call__(self, model) -> dict:
        own = [m.select_ratio for _, m in stlq_weights(model)]
        rec = {"accuracy": accuracy(model, self.curve_set), "nzr": nzr(model), "deployed": {}}
        for r in self.deploy_ratios:
            set_deploy(model, True, r)
            rec["deployed"][f"{r:g}"] = accuracy(model, self.curve_set)
        set_deploy(model, False)
        for (_, m), r in zip(stlq_weights(model), own):
            m.select_ratio = r
        return rec


def finetune(model, train_set, test_set, *, w_bits: int = 5, a_bits: int = 5, select_ratio: float = 0.15,
             lam: float = 3.0, tile: int | None = None, select: bool = True, epochs: int = 4, lr: float = 0.01,
             step_lr: float = 1e-3, weight_decay: float = 5e-4, batch_size: int = 128, seed: int = 0, device=None,
             calib=None, record_every: int = 10, curve_set=None, deploy_ratios=None, checkpoint=None,
             progress: bool = True, augment=None):
    """Prepare ``model`` (FP, left untouched) with :func:`prepare_stlq` and fine-tune it with the r1
    penalty (``select=False``: every second word penalised); returns ``(qat model, history)``,
    ``history`` as :func:`lowbit.lsq.train_qat`'s with the curve ``records`` of each epoch."""
    qmodel = prepare_stlq(model, w_bits, a_bits, select_ratio, tile, calib=train_set if calib is None else calib)
    recorder = CurveRecorder(test_set if curve_set is None else curve_set,
                             [select_ratio] if deploy_ratios is None else deploy_ratios)
    return train_qat(qmodel, train_set, test_set, epochs, lr=lr, step_lr=step_lr, weight_decay=weight_decay,
                     batch_size=batch_size, seed=seed, device=device, checkpoint=checkpoint, progress=progress,
                     augment=augment, penalty=R1Penalty(lam, select), recorder=recorder, record_every=record_every)
