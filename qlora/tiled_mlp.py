"""Sequence-tiled MLP: the decoder's MLP runs tile by tile and keeps only its input for backward.

A gated MLP saves three `tokens x intermediate` tensors per layer (gate, up and their product), and
its backward holds as many gradients: at long context these are the largest terms of a layer's
backward. The tiled version runs the MLP over tiles of tokens under `no_grad` in forward, keeping
only its input; backward recomputes each tile with grad and backpropagates it at once, so at most
one tile's intermediates exist at any time. The MLP acts on each token on its own, so the result
and every gradient are those of the untiled MLP.

Written by hand after Arctic Long Sequence Training's `TiledMLP` (snowflakedb/ArcticTraining,
also in DeepSpeed): neither is a dependency of qlora (DeepSpeed's is tied to its ZeRO engine), and
this one also replays LoRA dropout's random masks and the forward's autocast state in backward.
"""

from __future__ import annotations

import torch


def _rng_state(device: torch.device):
    """The generator state a tile's dropout draws from (CPU and, on a GPU, that device's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _bounds(tokens: int, tiles: int) -> list[tuple[int, int]]:
    """(start, end) of each tile: `torch.chunk`'s split, ceil(tokens / tiles) tokens each, the last one shorter."""
    size = -(-tokens // tiles)
    return [(start, min(start + size, tokens)) for start in range(0, tokens, size)]


class TiledMLPFunction(torch.autograd.Function):
    """forward(x, forward_fn, tiles, random, *params) -> forward_fn(x), computed over `tiles` tiles of tokens.

    `params` (the MLP's trained tensors) are inputs only so that autograd calls backward even when
    `x` needs no gradient (the first layer without checkpointing); their gradients are accumulated
    by the per-tile backward itself, as the untiled MLP would, and None is returned for them.
    `random`: the MLP draws random numbers (dropout in training), so each tile's generator state is
    kept and restored when the tile is recomputed, making backward see the forward's masks.
    """

    @staticmethod
    def forward(ctx, x, forward_fn, tiles, random, *params):
        ctx.forward_fn, ctx.tiles = forward_fn, tiles
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng_states = []
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        output = None  # written tile by tile: one tile's output beside it, not a list of them and their concatenation
        with torch.no_grad():
            for start, end in _bounds(flat.shape[0], tiles):
                if random:
                    ctx.rng_states.append(_rng_state(x.device))
                out = forward_fn(flat[start:end])
                output = out.new_empty(flat.shape[0], out.shape[-1]) if output is None else output
                output[start:end] = out
                del out
        return output.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grads = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        enabled, dtype = ctx.autocast
        for index, (start, end) in enumerate(_bounds(flat.shape[0], ctx.tiles)):
            # a fresh leaf per tile, dropped with its gradient before the next tile
            tile = flat[start:end].detach().requires_grad_(grad_input is not None)
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [], enabled=bool(ctx.rng_states)):
                if ctx.rng_states:
                    _set_rng_state(ctx.rng_states[index], x.device)
                with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                    output = ctx.forward_fn(tile)
            torch.autograd.backward(output, grads[start:end])
            del output
            if grad_input is not None:
                grad_input[start:end] = tile.grad
            del tile
        grad_x = grad_input.view_as(x) if grad_input is not None else None
        return (grad_x, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


def tile_mlp(mlp: torch.nn.Module, tiles_for) -> None:
    """Make `mlp` (a module mapping each token's hidden state on its own) run tiled.

    `tiles_for(tokens)` says how many tiles a call with `tokens` tokens uses; 1 runs the MLP as it is.
    """
    original = mlp.forward
    dropouts = [m for m in mlp.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]

    def forward(x):
        tiles = tiles_for(x[..., 0].numel())
        if tiles <= 1:
            return original(x)
        params = [p for p in mlp.parameters() if p.requires_grad]
        random = any(m.training for m in dropouts)
        return TiledMLPFunction.apply(x, original, tiles, random, *params)

    mlp.forward = forward


def decoder_mlps(model) -> list[torch.nn.Module]:
    """Every decoder layer's dense MLP (`layer.mlp`, the Llama-family name); mixture-of-experts blocks are left alone."""
    mlps = []
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and hasattr(module, "self_attn") and not hasattr(mlp, "experts"):
            mlps.append(mlp)
    return mlps
