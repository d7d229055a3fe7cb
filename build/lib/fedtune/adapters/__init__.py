"""Adapters from the papers that PEFT does not ship, one file each."""

import torch


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` ready for a matmul with adapter weights of `dtype`: under autocast the matmul casts both
    to its own dtype, so casting the activation to the fp32 adapter's dtype first only copies it
    (PEFT's LoRA layers skip the same cast, `client.train.autocast`); outside autocast it is cast."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)
