"""Checkpoint offload: the input each checkpointed layer keeps for its recompute lives in host RAM.

`offloaded(checkpoint_fn)` wraps whatever checkpoint function training chose (reentrant for ZeRO-3 and
FSDP, non-reentrant otherwise) in `torch.autograd.graph.save_on_cpu`, what transformers'
`activation_checkpointing_enable(offload=True)` installs. Checked on torch 2.13 with non-reentrant
checkpointing: the outer saved-tensor hooks see exactly one tensor per layer, the layer input the
checkpoint keeps for its recompute (`_CheckpointFrame.save_inputs`); everything saved inside the layer goes
to the checkpoint's own hooks and is recomputed. Under reentrant checkpointing the checkpoint function
saves its inputs with `save_for_backward`, which the same hooks see. So the hooks move precisely the
"layer inputs kept by checkpointing" term and nothing else; the copy to pinned memory is asynchronous on
the compute stream. torchtune's stream-overlapped hooks would also overlap the copy with compute, but
offload every saved tensor (they are written for the whole forward) and add a dependency for a few
percent of a long-context step. transformers' own `offload=True` is not called because it always asks for
pinned memory, which a machine without a GPU cannot give, and it replaces the checkpoint function instead
of wrapping the chosen one: here pinning is used only where CUDA is, so CPU tests run this very path.
"""

from __future__ import annotations

import functools

import torch


def offloaded(checkpoint_fn):
    """`checkpoint_fn` (a `torch.utils.checkpoint.checkpoint` with its settings) keeping its inputs in host RAM."""
    pin = torch.cuda.is_available()

    @functools.wraps(checkpoint_fn)
    def checkpoint_on_host(function, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return checkpoint_fn(function, *args, **kwargs)

    checkpoint_on_host.__name__ = "checkpoint_on_host"
    return checkpoint_on_host
