"""Quantization-aware training of a prepared model: :func:`train_qat`, on one process or many.

The authors' recipe (Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for
Neural Network Quantization*, ACCV 2024, code github.com/DensoITLab/nuLSQ; as LSQ, Esser et al.,
ICLR 2020): SGD with momentum 0.9, weight decay and cosine decay for the weights, Adam (cosine
decay too) for the step sizes, no weight decay on steps, BN parameters and biases.

**Several processes**: under ``torchrun --nproc_per_node=K`` (``WORLD_SIZE > 1`` in the environment)
:func:`train_qat` joins the process group (gloo on CPU, NCCL on CUDA) unless the caller already
did, wraps the model in ``DistributedDataParallel`` and shards every epoch with a
``DistributedSampler``; ``batch_size`` is per process. Only rank 0 writes the checkpoint.

**Checkpoint and resume**: with ``checkpoint=path`` a record (model, both optimizers, both
schedulers, history, configuration) is written atomically after every epoch, its SHA-256 over the
whole serialised record stored beside it in the same file; :func:`load_checkpoint` verifies it. A
later call with the same path and configuration resumes after the last finished epoch; the data
order and augmentation of epoch ``e`` depend only on ``(seed, e, rank)``, so a resumed run ends
with the same parameters as an uninterrupted one. A corrupt checkpoint or one written for another
configuration raises, and is never used.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..core.validation import check_positive_int, resolve_device
from ..data import TensorImageDataset
from ..results import CorruptCacheError, atomic_write_bytes
from .modules import _LearnedStepQuantizer
from .qat import step_parameters

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- processes
class _Processes:
    """Rank, world size and device of this process; joins the torchrun process group if needed."""

    def __init__(self, device):
        self.owned = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and dist.is_available() and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and str(device or "cuda").startswith("cuda") else "gloo"
            dist.init_process_group(backend)
            self.owned = True
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.distributed and dist.get_backend() == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = resolve_device(device, "cpu")

    def sum(self, *values: float) -> list[float]:
        """Sum of each value over every process."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.owned:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data
def _fetch(dataset, idx: list[int]):
    if isinstance(dataset, TensorImageDataset):
        t = torch.as_tensor(idx, dtype=torch.long)
        return dataset.images[t], dataset.labels[t]
    xs, ys = zip(*[dataset[i] for i in idx])
    return torch.stack(xs), torch.as_tensor(ys)


def _epoch_batches(dataset, batch_size: int, sampler):
    """Batches of the indices ``sampler`` yields (in-memory sets sliced directly, others through a DataLoader)."""
    if isinstance(dataset, TensorImageDataset):
        idx = list(sampler)
        for i in range(0, len(idx), batch_size):
            yield _fetch(dataset, idx[i:i + batch_size])
    else:
        yield from DataLoader(dataset, batch_size=batch_size, sampler=sampler)


@torch.no_grad()
def evaluate_sharded(model: nn.Module, dataset, procs: _Processes, batch_size: int = 500) -> dict:
    """Top-1 accuracy and mean loss of ``model`` on ``dataset``, each process taking every
    ``world``-th sample and the counts summed over processes (the whole set exactly once)."""
    was = model.training
    model.eval()
    idx = list(range(procs.rank, len(dataset), procs.world))
    correct = loss = 0.0
    for i in range(0, len(idx), batch_size):
        x, y = _fetch(dataset, idx[i:i + batch_size])
        logits = model(x.to(procs.device))
        y = y.to(procs.device)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
    correct, loss, n = procs.sum(correct, loss, len(idx))
    model.train(was)
    if n == 0:
        raise ValueError("test_set is empty: pass a data set of (image, label) pairs")
    return {"accuracy": 100.0 * correct / n, "loss": loss / n, "n": int(n)}


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, record: dict) -> None:
    """Write ``record`` atomically as ``{"format", "sha256", "blob"}``; the SHA-256 covers the whole
    serialised record ``blob``."""
    buf = io.BytesIO()
    torch.save(record, buf)
    blob = buf.getvalue()
    out = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(blob).hexdigest(), "blob": blob}, out)
    atomic_write_bytes(path, out.getvalue())


def load_checkpoint(path) -> dict:
    """The verified record of a :func:`save_checkpoint` file; :class:`~lowbit.results.CorruptCacheError`
    (a ``ValueError``) if it is unreadable or fails its checksum."""
    path = Path(path)
    fix = f"delete {path} to train from the start"
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
        blob, digest = outer["blob"], outer["sha256"]
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CorruptCacheError(f"QAT checkpoint {path} is unreadable ({type(err).__name__}): {fix}") from err
    if outer.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCacheError(f"QAT checkpoint {path} has format {outer.get('format')!r}, not "
                                f"{CHECKPOINT_FORMAT}: {fix}")
    if hashlib.sha256(blob).hexdigest() != digest:
        raise CorruptCacheError(f"QAT checkpoint {path} fails its SHA-256 checksum: {fix}")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- training
def _param_groups(model: nn.Module, weight_decay: float):
    steps = {id(p) for p in step_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in steps or not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_means(model: nn.Module) -> dict:
    """``{quantizer name: mean step size}`` of every LSQ/nuLSQ quantizer."""
    return {n: float(m.step_parameter.detach().clamp_min(0).mean())
            for n, m in model.named_modules() if isinstance(m, _LearnedStepQuantizer)}


def _check_args(model, train_set, test_set, epochs, lr, step_lr, weight_decay, batch_size, seed):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (from lowbit.lsq.prepare_qat), got {type(model).__name__}")
    if not step_parameters(model):
        raise ValueError("model has no LSQ/nuLSQ quantizer: prepare it with lowbit.lsq.prepare_qat first")
    for name, ds in (("train_set", train_set), ("test_set", test_set)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise ValueError(f"{name} must be a non-empty Dataset of (image, label) pairs")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        check_positive_int(v, name)
    for name, v in (("lr", lr), ("step_lr", step_lr)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def train_qat(model: nn.Module, train_set, test_set, epochs: int, lr: float = 0.01, step_lr: float = 1e-3,
              weight_decay: float = 5e-4, batch_size: int = 128, seed: int = 0, device=None, checkpoint=None,
              progress: bool = True, augment=None, stop_after: int | None = None, penalty=None,
              recorder=None, record_every: int | None = None):
    """Train a :func:`~lowbit.lsq.qat.prepare_qat` model; returns ``(model, history)``.

    ``history`` has one dict per epoch: ``epoch``, ``train_loss`` (mean over the epoch's batches and
    processes), ``batch_losses`` (this process's loss of every batch), ``test_loss``, ``test_accuracy``
    (whole ``test_set``), ``steps`` (mean step size per quantizer) and ``seconds`` (wall time since the start; the only entry a rerun changes).
    ``augment(x, generator) -> x`` is applied to every training batch (``None``: no augmentation).
    ``stop_after`` ends this call after that many epochs (an interruption, for resume).
    ``penalty(model) -> scalar tensor`` is added to every batch's task loss after the forward pass (a
    regulariser such as :func:`lowbit.alq.r1_penalty`; its ``repr`` goes into the checkpoint
    configuration). ``recorder(model) -> dict`` is called before the first iteration, after every
    ``record_every``-th one and after the last of each epoch (the model in eval mode); its dicts,
    with ``iteration``, are the epoch's ``records``. ``batch_losses`` and ``train_loss`` include the
    penalty.
    """
    _check_args(model, train_set, test_set, epochs, lr, step_lr, weight_decay, batch_size, seed)
    if (recorder is None) != (record_every is None) or (
            record_every is not None and (isinstance(record_every, bool) or not isinstance(record_every, int)
                                          or record_every < 1)):
        raise ValueError(f"pass recorder and record_every (a positive int) together, got recorder={recorder!r}, "
                         f"record_every={record_every!r}")
    if penalty is not None and not callable(penalty):
        raise TypeError(f"penalty must be a callable model -> scalar tensor, got {type(penalty).__name__}")
    procs = _Processes(device)
    try:
        return _train(model, train_set, test_set, epochs, lr, step_lr, weight_decay, batch_size, seed, procs,
                      checkpoint, progress, augment, stop_after, penalty, recorder, record_every)
    finally:
        procs.close()


def _record(model, recorder, iteration: int) -> dict:
    was = model.training
    model.eval()
    with torch.no_grad():
        rec = {"iteration": iteration, **recorder(model)}
    model.train(was)
    return rec


def _train(model, train_set, test_set, epochs, lr, step_lr, weight_decay, batch_size, seed, procs, checkpoint,
           progress, augment, stop_after, penalty, recorder, record_every):
    model = model.to(procs.device)
    sampler = DistributedSampler(train_set, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = -(-len(sampler) // batch_size)
    total = epochs * per_epoch
    opt_w = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=0.9)
    opt_s = torch.optim.Adam(step_parameters(model), lr=step_lr)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total) for o in (opt_w, opt_s)]
    config = {"epochs": epochs, "lr": lr, "step_lr": step_lr, "weight_decay": weight_decay,
              "batch_size": batch_size, "seed": seed, "world_size": procs.world, "n_train": len(train_set),
              "augment": None if augment is None else getattr(augment, "__name__", type(augment).__name__),
              "parameters": [[n, list(p.shape)] for n, p in model.named_parameters()]}
    if penalty is not None or recorder is not None:
        config.update(penalty=None if penalty is None else repr(penalty), record_every=record_every)
    history, start = [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        rec = load_checkpoint(checkpoint)
        if rec["config"] != config:
            raise ValueError(f"checkpoint {checkpoint} was written for another configuration "
                             f"({json.dumps(rec['config'])[:300]}...): pass another path or delete it")
        model.load_state_dict(rec["model"])
        opt_w.load_state_dict(rec["opt_w"])
        opt_s.load_state_dict(rec["opt_s"])
        for s, st in zip(scheds, rec["scheds"]):
            s.load_state_dict(st)
        history, start = rec["history"], rec["epoch"]
    net = model
    if procs.distributed:
        ids = [procs.device.index] if procs.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    t0 = time.time() - (history[-1]["seconds"] if history else 0.0)
    last = epochs if stop_after is None else min(epochs, start + stop_after)
    bar = tqdm(range(start, last), desc="QAT epochs", disable=not progress or procs.rank != 0)
    for epoch in bar:
        net.train()
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + procs.rank)
        loss_sum = n_seen = 0.0
        batch_losses, records = [], []
        if recorder is not None and epoch == 0:
            records.append(_record(model, recorder, 0))
        for b, (x, y) in enumerate(_epoch_batches(train_set, batch_size, sampler)):
            if augment is not None:
                x = augment(x, gen)
            x, y = x.to(procs.device), y.to(procs.device)
            loss = F.cross_entropy(net(x), y)
            if penalty is not None:
                loss = loss + penalty(model)
            opt_w.zero_grad(set_to_none=True)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            opt_s.step()
            for s in scheds:
                s.step()
            batch_losses.append(float(loss.detach()))
            loss_sum += batch_losses[-1] * len(y)
            n_seen += len(y)
            iteration = epoch * per_epoch + b + 1
            if recorder is not None and iteration % record_every == 0:
                records.append(_record(model, recorder, iteration))
        if recorder is not None and not (records and records[-1]["iteration"] == iteration):
            records.append(_record(model, recorder, iteration))  # every epoch ends with a record
        loss_sum, n_seen = procs.sum(loss_sum, n_seen)
        ev = evaluate_sharded(model, test_set, procs)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1), "test_loss": ev["loss"],
                        "test_accuracy": ev["accuracy"], "steps": step_means(model), "batch_losses": batch_losses,
                        "seconds": time.time() - t0, **({"records": records} if recorder is not None else {})})
        bar.set_postfix(acc=f"{ev['accuracy']:.2f}")
        if checkpoint is not None and procs.rank == 0:
            save_checkpoint(checkpoint, {"config": config, "epoch": epoch + 1, "model": model.state_dict(),
                                         "opt_w": opt_w.state_dict(), "opt_s": opt_s.state_dict(),
                                         "scheds": [s.state_dict() for s in scheds], "history": history,
                                         "rank": procs.rank, "world_size": procs.world})
        procs.barrier()
    return model.eval(), history
