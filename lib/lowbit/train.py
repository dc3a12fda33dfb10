"""Training loops: the FP baselines (``train_fp``) trained by our own code.

SGD with Nesterov momentum, cosine learning-rate decay, weight decay, and light
augmentation done on whole batches in torch (random shifts by up to ``pad`` pixels, and
horizontal flips for Fashion-MNIST only: digits are not flip-invariant).
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import TensorImageDataset, load_dataset
from .evaluate import evaluate
from .models import MODEL_NAMES, TRAIN_DATASETS, build, checkpoint_path
from .results import atomic_torch_save, atomic_write_text, sha256_file
from .utils import git_commit, seed_all


def augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and optional horizontal flip."""
    b, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])  # (B, H)
        cols = (dx[:, None] + torch.arange(w)[None])  # (B, W)
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def shift_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The Fashion-MNIST augmentation of the FP baselines: shifts by up to 2 pixels, horizontal flips."""
    return augment_batch(x, 2, True, generator)


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The MNIST augmentation of the FP baselines: shifts by up to 2 pixels (digits are not flip-invariant)."""
    return augment_batch(x, 2, False, generator)


def batch_augmentation(dataset: str):
    """The ``augment(x, generator) -> x`` our FP baselines were trained with on ``dataset``
    (``None`` for a data set without one)."""
    return {"fashion-mnist": shift_flip, "mnist": shift}.get(dataset)


def train_fp(name: str, dataset: str, epochs: int = 30, batch_size: int = 128, lr: float = 0.1,
             weight_decay: float = 5e-4, seed: int = 0, augment: bool = True, save: bool = True,
             limit_train: int | None = None, device=None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train model ``name`` on ``dataset`` from scratch; returns ``(model, metadata)``.

    With ``save=True`` the state dict is written atomically to
    ``data/models/<name>-<dataset>.pt`` and the metadata (test accuracy, seed, epochs,
    training time, commit, per-epoch history, SHA-256 of the checkpoint) beside it as JSON.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"train_fp trains one of {MODEL_NAMES}, got {name!r}")
    if dataset not in TRAIN_DATASETS:
        raise ValueError(f"train_fp trains on one of {TRAIN_DATASETS}, got {dataset!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device or "cpu")
    seed_all(seed)
    train = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test")
    assert isinstance(train, TensorImageDataset)
    x_all, y_all = train.images, train.labels
    if limit_train:
        x_all, y_all = x_all[:limit_train], y_all[:limit_train]
    model = build(name).to(device)
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (len(y_all) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.15, anneal_strategy="cos")
    gen = torch.Generator().manual_seed(seed)
    augmentation = batch_augmentation(dataset) if augment else None
    history = []
    t0 = time.time()
    for epoch in tqdm(range(epochs), desc=f"train {name}/{dataset}", disable=not progress):
        model.train()
        perm = torch.randperm(len(y_all), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            if augmentation is not None:
                x = augmentation(x, gen)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        ev = evaluate(model, test, device=device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / len(y_all),
                        "train_accuracy": 100.0 * correct / len(y_all),
                        "test_loss": ev["loss"], "test_accuracy": ev["accuracy"],
                        "seconds": time.time() - t0})
    model.eval()
    meta = {
        "model": name, "dataset": dataset, "test_accuracy": history[-1]["test_accuracy"],
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "augment": augment, "train_seconds": round(time.time() - t0, 1), "commit": git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
    }
    if save:
        path = checkpoint_path(name, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        meta["sha256"] = sha256_file(path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    return model, meta


def build_parser():
    """The ``python -m lowbit.train`` command line (model and data set checked by argparse)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lowbit.train", description="train an FP baseline")
    p.add_argument("model", choices=MODEL_NAMES)
    p.add_argument("dataset", choices=TRAIN_DATASETS)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    _, meta = train_fp(a.model, a.dataset, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed)
    print(f"{a.model}/{a.dataset}: test top-1 {meta['test_accuracy']:.2f}% in {meta['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
