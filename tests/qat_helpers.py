"""Shared fixtures-as-functions of the QAT tests (lsq and alq): a random image set and a seeded LeNet-5."""
import torch

from lowbit.data import TensorImageDataset
from lowbit.models import build
from lowbit.utils import seed_all


def random_images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return TensorImageDataset(x, torch.randint(0, 10, (n,), generator=g), "random", "train")


def seeded_lenet(seed=0):
    seed_all(seed)
    return build("lenet5").eval()
