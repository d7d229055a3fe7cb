"""A strict device for the CPU test suite: the model lives on a device that torch considers
different from the host, so an op mixing a model tensor with a tensor left on the host fails as
it does on a GPU, while every number is still computed by the CPU kernels.

How it works (torch >= 2.6; checked with 2.13):
- torch's Python PrivateUse1 backend (`torch.utils.backend_registration.
  _setup_privateuseone_for_python_backend`, the one of torch's own
  `test/test_privateuseone_python_backend.py`) is registered once per process under the name
  'strict': it gives the device type a Python device guard and hooks, so autograd runs there.
- A tensor on 'strict:0' is an `OnDevice` wrapper (`torch.Tensor._make_wrapper_subclass`)
  around a CPU tensor: `__torch_dispatch__` runs every aten op on the inner CPU tensors and wraps
  the results, and refuses an op that mixes a wrapper with a host tensor of more than 0 dims,
  with CUDA's message ("Expected all tensors to be on the same device ..."). As on CUDA, a 0-dim
  host tensor (a scalar) may mix, `copy_` / `_to_copy` cross devices, and advanced indexing takes
  host indices.
- `strict_device()` is a dispatch mode that turns tensors created for 'strict' (`x.to(dev)`,
  `torch.zeros(..., device=dev)`, `torch.arange(..., device=dev)`) into wrappers, plus a function
  mode for `torch.tensor` / `torch.as_tensor` (they build on the CPU below every dispatch mode).

Why not the other devices torch has without a GPU: 'meta' tensors are special-cased by torch
(`load_state_dict` into a meta parameter is a silent no-op, so PEFT's `set_peft_model_state_dict`
would load nothing) and a wrapper reporting 'cuda' fails in `Tensor.to` ("Torch not compiled with
CUDA enabled") before any mode sees the call; PrivateUse1 without the Python backend fails there
too ("PyTorch is not linked with support for privateuseone devices").

The backend must be registered before the process's first backward pass (`strict_backend()` at
import of the test module that uses it): autograd sizes its per-device queues then. Registering it
makes `torch.accelerator.current_accelerator()` report 'strict' for the rest of that process
(nothing in fedtune asks; transformers and accelerate ask for quantizers, offloaded checkpointing
and device_map='auto').

Limits: bf16 autocast is not modelled ('strict' has no autocast kernels: use fp32); ops that a
kernel runs on the host by design (CUDA's `.item()`, `nonzero` synchronisations) are not
distinguished; a check is only as wide as the paths a test runs under `strict_device()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

NAME = "strict"
aten = torch.ops.aten
# ops that cross devices on CUDA too: which tensor arguments may stay on the host
HOST_ARGS_ALLOWED: dict[Any, tuple[int, ...]] = {
    aten.copy_.default: (0, 1),
    aten._to_copy.default: (0,),
    aten.index.Tensor: (1,),  # indices
    aten.index_put_.default: (1,),
    aten.index_put.default: (1,),
    aten._index_put_impl_.default: (1,),
}


def strict_backend() -> torch.device:
    """The 'strict' device, registering torch's Python PrivateUse1 backend once per process."""
    from torch.utils import backend_registration as br

    if torch._C._get_privateuse1_backend_name() != NAME:
        br._setup_privateuseone_for_python_backend(NAME, backend_module=_Module())
    return torch.device(f"{NAME}:0")


class _Module:
    """What torch asks of a backend module (`torch.strict`); no autocast on this device."""

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return []

    def is_autocast_enabled(self) -> bool:
        return False

    def get_autocast_dtype(self) -> torch.dtype:
        return torch.float32

    def set_autocast_enabled(self, enabled: bool) -> None:
        pass

    def set_autocast_dtype(self, dtype: torch.dtype) -> None:
        pass


class OnDevice(torch.Tensor):
    """A tensor on 'strict:0' computed by the CPU: `inner` holds its values."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnDevice:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[no-any-return]
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=torch.device(f"{NAME}:0"),
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run(func, args, kwargs or {})


def _strict(device: Any) -> bool:
    return device is not None and torch.device(device).type == NAME


def _run(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """`func` on the CPU values; CUDA's device check first; results on 'strict' unless copied off."""
    leaves, _ = tree_flatten(args)
    on = [t for t in leaves if isinstance(t, OnDevice)] + [
        t for t in tree_flatten(kwargs)[0] if isinstance(t, OnDevice)
    ]
    if on:
        allowed = HOST_ARGS_ALLOWED.get(func, ())
        named = [(k, v) for k, v in kwargs.items() if k != "out"]
        for i, a in [*enumerate(args), *named]:
            if i in allowed:
                continue
            for t in tree_flatten(a)[0]:
                if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0:
                    raise RuntimeError(
                        "Expected all tensors to be on the same device, but found at least two devices, "
                        f"{NAME}:0 and {t.device}! ({func}: argument {i}, a host tensor of shape {tuple(t.shape)})"
                    )
    to_strict = _strict(kwargs.get("device"))
    if to_strict:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    inner_args, inner_kwargs = tree_map(lambda x: x.inner if isinstance(x, OnDevice) else x, (args, kwargs))
    out = func(*inner_args, **inner_kwargs)
    if not to_strict and (not on or "device" in kwargs):  # a host op, or a copy to the host
        return out
    wrappers = {id(t.inner): t for t in on}  # in-place ops return their (wrapped) input
    hosts = {id(t) for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)}

    def wrap(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or id(x) in hosts:
            return x
        return wrappers[id(x)] if id(x) in wrappers else OnDevice(x)

    return tree_map(wrap, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _strict(kwargs.get("device")) or any(isinstance(t, OnDevice) for t in tree_flatten((args, kwargs))[0]):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


class _Factories(TorchFunctionMode):
    """torch.tensor / as_tensor / asarray build below the dispatch modes: wrap them here."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _strict(kwargs.get("device")):
            host = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return host if isinstance(host, OnDevice) else OnDevice(host)
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_device() -> Iterator[torch.device]:
    """Within: tensors made for the 'strict' device are wrappers, and mixing them with host
    tensors raises. Yields the device (move the model there with `model.to(device)`)."""
    device = strict_backend()
    with _Factories(), _Dispatch():
        yield device
