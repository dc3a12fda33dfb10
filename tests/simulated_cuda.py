"""A simulated CUDA device for CPU-only test machines: a model of PyTorch's device rules, not a GPU.

Inside ``with simulated_cuda():`` the process acts as if it had one GPU, ``cuda:0``:
``torch.cuda.is_available()`` is True; ``torch.ones(3, device="cuda")``, ``x.to("cuda")``, ``x.cuda()``
and ``module.to("cuda")`` give tensors whose ``.device`` is ``cuda:0``. They hold CPU values and compute
on the CPU (so results equal a CPU run's), and every op is checked as PyTorch checks it on CUDA,
raising with PyTorch's own message where CUDA would raise:

* a CUDA tensor combined with a CPU tensor of >0 dims in one op (0-dim CPU tensors are allowed, as
  on CUDA; so is indexing a CUDA tensor with CPU indices; a CPU tensor with CUDA indices is not);
* ``searchsorted``/``bucketize`` with boundaries and values on different devices (even 0-dim);
* a CPU ``torch.Generator`` drawing CUDA random numbers;
* ``.numpy()`` / ``np.asarray`` of a CUDA tensor (TypeError);
* a CUDA tensor passed to a C kernel by ``lowbit.core.ckernel.tensor_ptr`` (on a GPU: host code
  reading a device pointer, garbage or a segfault).

It cannot check numerics (it *is* the CPU: no TF32, no CUDA reduction order, no cuDNN algorithms),
kernels, streams and asynchrony, memory, NCCL or multi-GPU code, pinned memory, CUDA random streams
(CUDA random ops draw from the CPU generator here), ``torch.save``/``load`` of CUDA tensors, or
``p.data = cpu_tensor`` on a CUDA parameter (raises here; a GPU silently moves ``p`` to the CPU).

How: :class:`SimCudaTensor` wraps a CPU tensor. To C++ (autograd included) its device is ``meta``,
which needs no driver, so ``backward`` and training work; to Python ``.device`` is ``cuda:0``. A
``TorchDispatchMode`` sees every ATen op, checks the rules, runs the op on the CPU values and wraps
the outputs. Every patch is undone on exit, also on an exception. (A ``SimCudaTensor`` kept past the
exit still computes, with the same checks, but new CUDA tensors cannot be made.)
"""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch._dynamo  # noqa: F401  (imported before any patch: its first use maps torch's functions)
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)
_INDEX_OPS = {"index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_"}
_NO_CPU_SCALARS = {"searchsorted", "bucketize", "index_select", "gather", "scatter", "scatter_add", "take"}
_NO_STREAM = types.SimpleNamespace(is_capturing=lambda: False, synchronize=lambda: None)


def _mixing_error(op: str) -> RuntimeError:
    return RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                        f"cuda:0 and cpu! (simulated CUDA, op {op})")


class SimCudaTensor(torch.Tensor):
    """A tensor that reports ``cuda:0`` and holds its values in ``self.elem`` (a CPU tensor)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device="meta", requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl
    device = property(lambda self: CUDA)
    is_cuda, is_cpu, is_meta = property(lambda self: True), property(lambda self: False), property(lambda self: False)

    def _set_data(self, value):  # `p.data = q`: the wrapper must take q's values too
        if not isinstance(value, SimCudaTensor):
            raise RuntimeError("simulated CUDA: `.data = <CPU tensor>` on a CUDA tensor (on a GPU it silently "
                               "moves that tensor to the CPU)")
        torch.Tensor.data.__set__(self, value)
        self.elem = value.elem

    data = property(torch.Tensor.data.__get__, _set_data)

    def get_device(self):
        return 0

    def tolist(self):  # a CUDA tensor's tolist() copies to the host: allowed
        return self.elem.tolist()

    def __repr__(self, **kwargs):
        return f"SimCudaTensor({self.elem!r}, device='cuda:0')"

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def __array__(self, *args, **kwargs):  # np.asarray / np.array
        return self.numpy()

    def __reduce_ex__(self, proto):  # torch.save: the CPU values, what map_location="cpu" gives
        return self.elem.__reduce_ex__(proto)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _map(fn, obj):
    """``fn`` applied to every leaf of nested lists/tuples/dicts (torch's pytree, ~5x faster here)."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, a) for a in obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _on_sim(device) -> bool:
    return device is not None and torch.device(device).type in ("cuda", "meta")


def _check(func, args, flat) -> None:
    """Raise where CUDA would: an op with a simulated CUDA tensor among ``flat``, its arguments."""
    name = func.overloadpacket.__name__
    if name in ("searchsorted", "bucketize"):
        bounds, values = (args[0], args[1]) if name == "searchsorted" else (args[1], args[0])
        devs = ["cuda" if isinstance(t, SimCudaTensor) else "cpu" for t in (bounds, values)]
        if isinstance(values, torch.Tensor) and devs[0] != devs[1]:
            raise RuntimeError(f"torch.searchsorted(): boundaries and input value tensors should have same "
                               f"device type, but got boundaries tensor device type {devs[0]} and input value "
                               f"tensor device type {devs[1]}")
    if name in _INDEX_OPS:
        self_t, indices = args[0], [i for i in args[1] if i is not None]
        if not isinstance(self_t, SimCudaTensor):
            if any(isinstance(i, SimCudaTensor) for i in indices):
                raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
            raise _mixing_error(name)  # CPU self, CUDA values
        flat = [t for t in flat if not any(t is i for i in indices)]  # CPU indices: allowed
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, SimCudaTensor)]
    if any(t.dim() > 0 or name in _NO_CPU_SCALARS for t in cpu):
        raise _mixing_error(name)


def _dispatch(func, args, kwargs):
    flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
    sims = [t for t in flat if isinstance(t, SimCudaTensor)]
    target = kwargs.get("device")
    if func is aten.copy_.default:  # copies between devices are allowed; the result is self
        to_sim = isinstance(args[0], SimCudaTensor)
    else:
        to_sim = _on_sim(target) if target is not None else bool(sims)
        if to_sim and any(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in flat):
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
        if sims and func is not aten._to_copy.default:  # to/cpu/cuda: allowed between devices
            _check(func, args, flat)
    args, kwargs = _map(lambda t: t.elem if isinstance(t, SimCudaTensor) else t, (args, kwargs))
    if target is not None:
        kwargs["device"] = torch.device("cpu")
    kwargs.pop("pin_memory", None)
    out = func(*args, **kwargs)
    if not to_sim:
        return out

    def wrap(t):
        if not isinstance(t, torch.Tensor) or isinstance(t, SimCudaTensor):
            return t
        same = [s for s in sims if s.elem is t]  # in-place ops return self
        return same[0] if same else SimCudaTensor(t)

    return _map(wrap, out)


class _SimCudaMode(TorchDispatchMode):
    """Sees every op, also factories (``torch.zeros(..., device="cuda")``) that have no tensor input."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _cuda_index(device):
    """``"cuda"`` -> ``cuda:0``: resolving a bare ``"cuda"`` would ask the (absent) driver."""
    if isinstance(device, (str, torch.device)) and torch.device(device) == torch.device("cuda"):
        return CUDA
    return device


def _built_on_cpu(factory):
    """``torch.tensor``/``torch.as_tensor`` with ``device="cuda"``: built on the CPU, then moved."""
    def make(*args, device=None, **kwargs):
        if not _on_sim(device):
            return factory(*args, device=device, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        t = factory(*args, **kwargs).to(CUDA)
        return t.requires_grad_() if requires_grad else t
    return make


@contextlib.contextmanager
def simulated_cuda():
    """Simulate one CUDA GPU (``cuda:0``) until exit; every patch is undone on exit, even on error."""
    import lowbit.core.ckernel as ckernel

    to = torch.Tensor.to
    with pytest.MonkeyPatch.context() as mp:
        nothing = lambda *a, **k: None  # noqa: E731
        for name, value in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                            "synchronize": nothing, "set_device": nothing, "_lazy_init": nothing,
                            "get_device_name": lambda *a, **k: "simulated CUDA (CPU)"}.items():
            mp.setattr(torch.cuda, name, value)
        for name, value in {"current_device_index": lambda: 0, "synchronize": nothing,
                            "current_stream": lambda *a, **k: _NO_STREAM}.items():
            mp.setattr(torch.accelerator, name, value)  # e.g. the optimizers' CUDA-graph capture check
        mp.setattr(torch.Tensor, "to", lambda self, *a, **k: to(self, *map(_cuda_index, a),
                                                                 **{n: _cuda_index(v) for n, v in k.items()}))
        for name in ("tensor", "as_tensor"):
            mp.setattr(torch, name, _built_on_cpu(getattr(torch, name)))
        mp.setattr(torch.Tensor, "cuda", lambda self, device=None, *a, **k: to(self, _cuda_index(device or CUDA)))
        # inference tensors cannot be wrapped by a subclass: inference_mode is no_grad here
        mp.setattr(torch, "inference_mode", lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext())
        original = ckernel.tensor_ptr

        def guard(t, *args, **kwargs):
            if isinstance(t, SimCudaTensor):
                raise RuntimeError("a CUDA tensor was passed to a C kernel (tensor_ptr): the kernel would read "
                                   "a device pointer on the host (simulated CUDA)")
            return original(t, *args, **kwargs)

        for mod in [m for n, m in sys.modules.items() if n.startswith("lowbit") and m is not None]:
            if getattr(mod, "tensor_ptr", None) is original:  # `from ..core.ckernel import tensor_ptr` too
                mp.setattr(mod, "tensor_ptr", guard)
        with _SimCudaMode():
            yield
