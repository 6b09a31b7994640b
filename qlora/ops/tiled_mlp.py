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

    `params` (the MLP's trained tensors) are inputs: each tile's gradients w.r.t. them are taken with
    `torch.autograd.grad` (no accumulation into `.grad`, so no gradient hook fires per tile), summed over the
    tiles, and returned once, as the untiled MLP's backward would give them: DDP's, FSDP's and ZeRO-3's hooks
    fire once per backward. Being inputs also makes autograd call backward when `x` needs no gradient (the
    first layer without checkpointing).
    `random`: the MLP draws random numbers (dropout in training), so each tile's generator state is
    kept and restored when the tile is recomputed, making backward see the forward's masks.
    """

    @staticmethod
    def forward(ctx, x, forward_fn, tiles, random, *params):
        ctx.forward_fn, ctx.tiles, ctx.params = forward_fn, tiles, params
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
        params = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[4:]) if needed]
        sums = [None] * len(params)  # each parameter's gradient, summed over the tiles
        enabled, dtype = ctx.autocast
        for index, (start, end) in enumerate(_bounds(flat.shape[0], ctx.tiles)):
            # a fresh leaf per tile, dropped with its gradient before the next tile
            tile = flat[start:end].detach().requires_grad_(grad_input is not None)
            with torch.random.fork_rng(
                devices=[x.device] if x.device.type == "cuda" else [], enabled=bool(ctx.rng_states)
            ):
                if ctx.rng_states:
                    _set_rng_state(ctx.rng_states[index], x.device)
                with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                    output = ctx.forward_fn(tile)
            wrt = ([tile] if grad_input is not None else []) + params
            found = list(torch.autograd.grad(output, wrt, grads[start:end], allow_unused=True))
            del output
            if grad_input is not None:
                grad_input[start:end] = found.pop(0)
            for i in range(len(sums)):  # by index: no loop variable keeps a tile's gradient alive into the next tile
                if found[i] is not None:
                    sums[i] = found[i] if sums[i] is None else sums[i].add_(found[i])
            del tile, found
        grad_x = grad_input.view_as(x) if grad_input is not None else None
        summed = iter(sums)
        return (grad_x, None, None, None, *(next(summed) if needed else None for needed in ctx.needs_input_grad[4:]))


class TiledMLP(torch.nn.Module):
    """A decoder layer's MLP that runs over `tiles_for(tokens)` tiles of tokens (1: as it is).

    It takes over the MLP's parameters, submodules and attributes under their own names (and runs the MLP
    class's own forward on them), so the model's state dict, peft's adapter keys and every hook are those
    of the untiled model; `print(model)` shows the swap.
    """

    def __init__(self, mlp: torch.nn.Module, tiles_for):
        super().__init__()
        self.__dict__.update(mlp.__dict__)
        self.untiled_class = type(mlp)
        self.tiles_for = tiles_for

    def untiled(self, x):
        return self.untiled_class.forward(self, x)

    def forward(self, x):
        tiles = self.tiles_for(x[..., 0].numel())
        if tiles <= 1:
            return self.untiled(x)
        params = [p for p in self.parameters() if p.requires_grad]
        random = any(m.training and m.p > 0 for m in self.modules() if isinstance(m, torch.nn.Dropout))
        return TiledMLPFunction.apply(x, self.untiled, tiles, random, *params)

    def extra_repr(self) -> str:
        return f"tiles of {self.untiled_class.__name__}"


def decoder_layers_with_mlp(model) -> list[torch.nn.Module]:
    """Every decoder layer with a dense MLP (`layer.mlp`, the Llama-family name); mixture-of-experts blocks are left
    alone.
    """
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "mlp", None), torch.nn.Module)
        and hasattr(module, "self_attn")
        and not hasattr(module.mlp, "experts")
    ]


def decoder_mlps(model) -> list[torch.nn.Module]:
    """Every decoder layer's dense MLP."""
    return [layer.mlp for layer in decoder_layers_with_mlp(model)]


def tile_mlps(model, tiles_for) -> None:
    """Swap every decoder layer's MLP for a `TiledMLP` (`tiles_for(tokens)`: the tiles of a `tokens`-token call)."""
    for layer in decoder_layers_with_mlp(model):
        if not isinstance(layer.mlp, TiledMLP):
            layer.mlp = TiledMLP(layer.mlp, tiles_for)
