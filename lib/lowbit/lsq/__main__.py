"""``python -m lowbit.lsq``: LSQ/nuLSQ QAT of a committed FP checkpoint, or of torchvision's ImageNet
networks, from the command line, on one process or under ``torchrun`` (DistributedDataParallel, gloo
on CPU, NCCL on CUDA)::

    .venv/bin/python -m lowbit.lsq lenet5 mnist --variant nuLSQ-WA --bits 2 --epochs 2
    .venv/bin/torchrun --standalone --nproc_per_node=2 -m lowbit.lsq lenet5 mnist --variant LSQ --bits 4 \\
        --checkpoint runs/qat/lenet5.pt
    .venv/bin/torchrun --standalone --nproc_per_node=8 -m lowbit.lsq resnet18 imagenet --data-dir /data/imagenet \\
        --weights DEFAULT --variant nuLSQ-A --bits 3 --epochs 90 --batch-size 32 --checkpoint runs/qat/r18.pt

Run from the project root. ``--batch-size`` is per process. ImageNet (:mod:`lowbit.imagenet`): the
``train/`` split with its random-resized-crop transform, evaluation on ``val/``; ``--weights`` is
``DEFAULT`` (torchvision's) or a saved state dict.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .. import imagenet
from ..data import calibration_subset, head, load_dataset
from ..models import MODEL_NAMES, TRAIN_DATASETS, load_pretrained
from ..results import atomic_torch_save
from ..train import batch_augmentation
from ..utils import seed_all
from .qat import CALIB_N, VARIANTS, prepare_variant
from .training import train_qat


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowbit.lsq", description="LSQ / nuLSQ quantization-aware training")
    p.add_argument("model", choices=MODEL_NAMES + imagenet.MODELS)
    p.add_argument("dataset", choices=TRAIN_DATASETS + ("imagenet",))
    p.add_argument("--data-dir", default=None, help="imagenet: the folder holding train/ and val/ ImageFolders")
    p.add_argument("--weights", default=None, help="imagenet: DEFAULT (torchvision's) or a saved state dict")
    p.add_argument("--device", default=None, help="cpu or cuda (under torchrun on CUDA: one GPU per process)")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="nuLSQ-WA")
    p.add_argument("--bits", type=int, default=4, help="W/A bit width of the body layers (2..8)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-n", type=int, default=None, help="a fixed seeded subset of this many training images")
    p.add_argument("--test-n", type=int, default=None, help="evaluate on the first N test images (default all)")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--step-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--checkpoint", default=None, help="per-epoch checkpoint; an existing one is resumed")
    p.add_argument("--save", default=None, help="write the final state dict here (rank 0)")
    p.add_argument("--dump-params", default=None, help="every rank writes rank<r>.pt with its final parameters")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    size = 224
    if a.dataset == "imagenet":
        if a.model not in imagenet.MODELS:
            parser.error(f"imagenet trains one of {imagenet.MODELS}, not {a.model}")
        imagenet.use(a.data_dir, a.weights)  # checks the folder now
        size = imagenet.image_size(a.model)
    elif a.model not in MODEL_NAMES or a.data_dir or a.weights:
        parser.error(f"{a.model}/{a.dataset}: torchvision networks, --data-dir and --weights are for imagenet")
    if a.threads:
        torch.set_num_threads(a.threads)
    seed_all(a.seed)
    train = load_dataset(a.dataset, "train", image_size=size)
    if a.train_n is not None and a.train_n < len(train):
        train = calibration_subset(train, a.train_n, seed=0)
    test = head(load_dataset(a.dataset, "test", image_size=size), a.test_n)
    model = prepare_variant(load_pretrained(a.model, a.dataset), a.variant, a.bits, calib=head(train, CALIB_N))
    model, history = train_qat(model, train, test, a.epochs, lr=a.lr, step_lr=a.step_lr, batch_size=a.batch_size,
                               seed=a.seed, checkpoint=a.checkpoint, device=a.device,
                               augment=None if a.no_augment else batch_augmentation(a.dataset))
    rank = int(os.environ.get("RANK", "0"))
    if a.dump_params:
        atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                          Path(a.dump_params) / f"rank{rank}.pt")
    if rank == 0:
        if a.save:
            atomic_torch_save(model.state_dict(), a.save)
        last = history[-1]
        print(f"{a.model}/{a.dataset} {a.variant} W/A {a.bits}/{a.bits}: test top-1 {last['test_accuracy']:.2f}% "
              f"after {last['epoch']} epochs, {last['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
