"""Peer-library baselines: published post-training quantizers run through their own libraries.

Thin adapters, no re-implementation: each one hands our FP model (e.g. ``lowbit.models.build("lenet5")``
or a committed checkpoint from ``lowbit.models.load_pretrained``) and calibration images to the
library, lets it compute its rounding, and copies its fake-quantized weights back into a BN-folded
copy of our model, so the result is a plain torch model that :func:`lowbit.evaluate.accuracy`
evaluates. Weight-only, per output channel, first conv and last linear layer at 8 bits (lowbit's
first/last rule, :func:`lowbit.peers.common.layer_bits`); biases and activations stay in floating
point. The input model is never modified.

==================================  ===========================================================
``"aimet-adaround"``                AdaRound: Nagel, Amjad, van Baalen, Louizos, Blankevoort,
:func:`aimet_adaround`              *Up or Down? Adaptive Rounding for Post-Training Quantization*,
                                    ICML 2020, arXiv:2004.10568; by AIMET (Qualcomm Innovation
                                    Center, github.com/quic/aimet; Siddegowda et al.,
                                    arXiv:2201.08442), PyPI ``aimet-torch`` (:mod:`.aimet`).
``"brevitas-gptq"``                 GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, *GPTQ: Accurate
:func:`brevitas_gptq`               Post-Training Quantization for Generative Pre-trained
                                    Transformers*, ICLR 2023, arXiv:2210.17323; by Brevitas
                                    (AMD, github.com/Xilinx/brevitas, doi:10.5281/zenodo.3333552),
                                    PyPI ``brevitas`` (:mod:`.brevitas`).
``"brevitas-learned-round"``        AdaRound's learned rounding by Brevitas' learned-round trainer
:func:`brevitas_learned_round`      (:mod:`.brevitas`).
==================================  ===========================================================

The libraries are optional: ``make peers`` installs the exact pins of ``requirements-peers.txt``
into ``.venv`` with ``pip install --no-deps`` (so ``torch==2.14.1`` and ``torchvision==0.29.1``
stay as pinned). They are imported inside the adapters; a missing one is a ``ValueError`` that
names ``make peers``. Every adapter returns ``(quantized model, info)`` with ``info`` holding the
library, its version, the method, the iteration count and the wall time in seconds.
"""
from __future__ import annotations

from .aimet import aimet_adaround
from .brevitas import brevitas_gptq, brevitas_learned_round
from .common import INSTALL, MAX_BITS, PeerRequest, layer_bits, prepare  # noqa: F401

ADAPTERS = {"aimet-adaround": aimet_adaround, "brevitas-gptq": brevitas_gptq,
            "brevitas-learned-round": brevitas_learned_round}
METHODS = tuple(ADAPTERS)

__all__ = ["ADAPTERS", "INSTALL", "MAX_BITS", "METHODS", "PeerRequest", "aimet_adaround", "brevitas_gptq",
           "brevitas_learned_round", "layer_bits", "prepare", "quantize_with_peer"]


def quantize_with_peer(model, method: str, calib, w_bits: int, **options):
    """``(quantized model, info)`` of the peer ``method`` (one of :data:`METHODS`); ``options`` go to
    its adapter (``iterations=`` is required by ``"aimet-adaround"`` and ``"brevitas-learned-round"``)."""
    if not isinstance(method, str) or method not in ADAPTERS:
        raise ValueError(f"unknown peer method {method!r}: use one of {METHODS}")
    return ADAPTERS[method](model, calib, w_bits, **options)
