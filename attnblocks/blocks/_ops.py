"""Tensor operations shared by the attention blocks.

Pooling here accumulates float16 and bfloat16 inputs in float32, the way
:class:`~attnblocks.SEBlock` does, and the helpers that build a block's output
keep the input's memory format (contiguous, ``channels_last`` or
``channels_last_3d``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnblocks._errors import InvalidInputError
from attnblocks._torch_compat import is_compiling, is_exporting
from attnblocks._validation import check_feature_map

__all__ = [
    "accumulation_dtype",
    "channel_projection",
    "check_block_input",
    "count_true",
    "global_avg_pool",
    "global_avg_pool_for",
    "global_max_pool",
    "has_zero_extent",
    "match_memory_format",
    "per_channel",
    "scale_gate",
    "spatial_dims_of",
    "spatial_dot",
    "to_dtype",
]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions over ``dtype`` values run in: float32 for half types, else ``dtype``.

    >>> accumulation_dtype(torch.bfloat16)
    torch.float32
    >>> accumulation_dtype(torch.float64)
    torch.float64
    """
    return torch.float32 if dtype in _HALF_TYPES else dtype


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``t`` cast to ``dtype`` (``t`` itself when it already has it).

    ``Tensor.to`` is a no-op for the same dtype, but the call alone costs about a
    microsecond, a few percent of a small block's forward. Blocks compute their gates
    in the dtype of their parameters (autocast, when active, still decides inside each
    layer) and cast the gate to the input's dtype only to apply it.

    >>> t = torch.zeros(2)
    >>> to_dtype(t, torch.float32) is t, to_dtype(t, torch.float64).dtype
    (True, torch.float64)
    """
    return t if t.dtype == dtype else t.to(dtype)


def per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An ``(N, C)`` tensor in ``x``'s dtype, viewed as ``(N, C, 1, ...)`` to broadcast over ``x``.

    >>> per_channel(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, 4, 5)).shape
    torch.Size([2, 3, 1, 1])
    """
    return to_dtype(values, x.dtype).view(values.shape + (1,) * (x.dim() - 2))


def scale_gate(gate: torch.Tensor, scale: float) -> torch.Tensor:
    """``gate * scale``, or ``gate`` itself for a scale of 1 (no multiplication at all).

    ``init="identity"`` scales a block's gates by ``1 / gate(0)``; every other block
    applies its gate as it is.
    """
    return gate * scale if scale != 1.0 else gate


def spatial_dims_of(x: torch.Tensor) -> tuple[int, ...]:
    """The indices of the spatial dimensions of an ``(N, C, *spatial)`` tensor."""
    return tuple(range(2, x.dim()))


def has_zero_extent(x: torch.Tensor) -> bool:
    """Whether an ``(N, C, *spatial)`` tensor has a spatial dimension of size 0.

    Such a feature map has no positions: blocks return it unchanged in shape (an
    empty output), their spatial maps are empty, and a channel statistic over no
    positions is what the reduction gives (the mean of nothing is NaN).

    >>> has_zero_extent(torch.zeros(2, 3, 0, 4)), has_zero_extent(torch.zeros(0, 3, 4, 4))
    (True, False)
    """
    return 0 in x.shape[2:]


def count_true(mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The number of ``True`` values of a boolean ``mask`` over ``dims`` (keepdim), exact.

    A sum of booleans into any wider type first converts the whole mask (a full-size
    temporary, 4.3 ms of a 13 ms backward at (256, 16, 32, 32)); a ``uint8`` sum reads
    it as it is. So the last of ``dims`` is summed in ``uint8`` when it has at most 255
    entries (no overflow), and the rest, now that much smaller, in ``int32``.

    >>> mask = torch.tensor([[[True, False, True], [True, True, True]]])
    >>> count_true(mask, (1, 2)).flatten().tolist(), count_true(mask, (2,)).flatten().tolist()
    ([5], [2, 3])
    """
    dims = tuple(d % mask.dim() for d in dims)
    last = max(dims)
    if mask.shape[last] > 255:
        return mask.sum(dim=dims, keepdim=True, dtype=torch.int32)
    partial = mask.view(torch.uint8).sum(dim=last, keepdim=True, dtype=torch.uint8)
    rest = tuple(d for d in dims if d != last)
    if not rest:
        return partial.to(torch.int32)
    return partial.sum(dim=rest, keepdim=True, dtype=torch.int32)


# The largest float32 temporary, in elements, that a half-type reduction makes on the CPU.
# PyTorch's CPU reductions with a wider ``dtype`` first cast the whole input; for a large
# feature map that cast is a fresh allocation above glibc's mmap threshold (32 MiB), paid
# in page faults on every call. Measured on a 2-core AVX-512 machine, mean of a
# (256, 32, 32, 32) bfloat16 map in float32: 10 ms in one call, 1 ms in 4 MiB batch chunks.
_CHUNK_ELEMENTS = 1 << 20


def _batch_chunk(x: torch.Tensor) -> int | None:
    """Samples per chunk for a float32 reduction over the half-type ``x``, or None (one call)."""
    if (
        x.dtype not in _HALF_TYPES
        or x.device.type != "cpu"
        or x.numel() <= _CHUNK_ELEMENTS
        or x.shape[0] < 2
        or is_compiling()
        or torch.jit.is_tracing()
    ):
        return None
    return max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over every spatial dimension: ``(N, C, *spatial) -> (N, C)``, in the accumulation dtype.

    Half types accumulate in float32 (on the CPU, large inputs are reduced a few
    samples at a time, so no full-size float32 copy is made).

    >>> global_avg_pool(torch.ones(2, 3, 4, 4, dtype=torch.float16)).dtype
    torch.float32
    """
    dims, acc = spatial_dims_of(x), accumulation_dtype(x.dtype)
    chunk = _batch_chunk(x)
    if chunk is None:
        return x.mean(dim=dims, dtype=acc)
    return torch.cat([part.mean(dim=dims, dtype=acc) for part in x.split(chunk)])


def global_avg_pool_for(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`global_avg_pool` for a caller that rounds the result to ``dtype`` next.

    The same as :func:`global_avg_pool`, except for a bfloat16 ``x`` on the CPU whose mean
    goes on in bfloat16 (bfloat16 weights, or bfloat16 autocast): then the mean is
    PyTorch's bfloat16 sum, which accumulates in float32 and rounds once, divided by the
    number of positions in float32. That skips the float32 copy of ``x`` that a float32
    result makes PyTorch take first (2-4x faster on the CPU at batch 256), and after the
    caller's cast to bfloat16 it equals the rounded float32 mean up to summation order
    (exactly so for a power-of-two number of positions; otherwise by one more rounding).

    >>> x = torch.ones(2, 3, 4, 4, dtype=torch.bfloat16)
    >>> global_avg_pool_for(x, torch.bfloat16).dtype
    torch.float32
    >>> torch.equal(global_avg_pool_for(x, torch.bfloat16), global_avg_pool(x))
    True
    """
    if dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return x.sum(dim=spatial_dims_of(x)).float() / math.prod(x.shape[2:])
    return global_avg_pool(x)


def spatial_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-channel ``sum over spatial dims of a * b``, ``(N, C, *spatial) -> (N, C)``.

    The product is formed in the inputs' dtype (as autograd's ``(a * b).sum()``
    would) and summed in the accumulation dtype (float32 for half types), chunked
    like :func:`global_avg_pool`.

    >>> a = torch.ones(2, 3, 4, 4)
    >>> spatial_dot(a, 2 * a)[0, 0].item()
    32.0
    """
    dims, acc = spatial_dims_of(a), accumulation_dtype(a.dtype)
    chunk = _batch_chunk(a)
    if chunk is None:
        return (a * b).sum(dim=dims, dtype=acc)
    pairs = zip(a.split(chunk), b.split(chunk), strict=True)
    return torch.cat([(pa * pb).sum(dim=dims, dtype=acc) for pa, pb in pairs])


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Maximum over every spatial dimension: ``(N, C, *spatial) -> (N, C)``.

    The maximum is exact in any dtype; the result is returned in the
    accumulation dtype so that it can be combined with :func:`global_avg_pool`.
    Over no positions (a spatial size of 0) it is NaN, like the mean.

    >>> global_max_pool(torch.zeros(2, 3, 0, 4))
    tensor([[nan, nan, nan],
            [nan, nan, nan]])
    """
    if has_zero_extent(x):
        return x.new_full(x.shape[:2], float("nan"), dtype=accumulation_dtype(x.dtype))
    if _max_pool_kernel_applies(x):
        # The same values (a maximum is exact, NaN propagates), from the max-pool kernel.
        maximum = F.adaptive_max_pool2d(x, 1).flatten(1)
    else:
        maximum = x.amax(dim=spatial_dims_of(x))
    return maximum.to(accumulation_dtype(x.dtype))


def _max_pool_kernel_applies(x: torch.Tensor) -> bool:
    """Whether :func:`global_max_pool` may use the max-pool kernel for ``x``.

    Only where it is faster and where nothing is differentiated through it: its
    backward sends a tied maximum's gradient to one position, ``amax``'s splits it
    between all of them, and both paths of a block must agree. Faster means a
    channels-last 4-D map on the CPU in bfloat16, or with fewer than 32 channels (then
    ``amax`` reduces a short inner dimension). Measured against ``amax`` on 1 and 2
    threads: 5.8x-7.5x at (256, 16, 32, 32), float32 and bfloat16; 1.1x-1.4x in
    bfloat16 at 64 to 512 channels; 0.5x-0.8x in float32 at 32 to 512 channels.
    Traces and exports keep ``amax``, whatever the example input.
    """
    return (
        not (torch.jit.is_tracing() or is_exporting())
        and x.dim() == 4
        and x.device.type == "cpu"
        and (x.dtype == torch.bfloat16 or (x.shape[1] < 32 and x.dtype.is_floating_point))
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (x.requires_grad and torch.is_grad_enabled())
    )


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def channel_projection(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A 1x1 convolution of any spatial rank: ``(N, C, *s) -> (N, O, *s)``.

    Args:
        x: input of shape ``(N, C, *spatial)`` with 1 to 3 spatial dimensions.
        weight: ``(O, C)`` matrix, for example an ``nn.Linear(C, O).weight``;
            cast to ``x.dtype``.
        bias: optional ``(O,)`` bias, cast to ``x.dtype``.

    >>> channel_projection(torch.ones(2, 3, 4, 5), torch.ones(1, 3)).shape
    torch.Size([2, 1, 4, 5])
    >>> channel_projection(torch.ones(2, 3, 0, 5), torch.ones(1, 3)).shape
    torch.Size([2, 1, 0, 5])
    """
    if has_zero_extent(x):  # convolutions refuse empty maps; the product is just as empty
        out = torch.einsum("nc...,oc->no...", x, weight.to(x.dtype))
        return out if bias is None else out + bias.to(x.dtype).view(-1, *([1] * (x.dim() - 2)))
    rank = x.dim() - 2
    kernel = weight.to(x.dtype).reshape(*weight.shape, *([1] * rank))
    return _CONV[rank](x, kernel, None if bias is None else bias.to(x.dtype))


def match_memory_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``out`` in the memory format of ``like`` (a no-op when it already is).

    ``like`` counts as contiguous when it is, else as ``channels_last`` (4D) or
    ``channels_last_3d`` (5D) when it is that; any other layout is left alone.
    """
    if like.is_contiguous():
        fmt = torch.contiguous_format
    elif like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    else:
        return out
    return out.contiguous(memory_format=fmt)


def check_block_input(
    x: object, channels: int, *, owner: str, spatial_dims: tuple[int, ...], reason: str = ""
) -> None:
    """Check a block's input: a floating ``(N, C, *spatial)`` tensor with a supported rank.

    Args:
        x: the block's input.
        channels: the channel count the block was built for.
        owner: the block's class name, used in messages.
        spatial_dims: the numbers of spatial dimensions the block accepts, e.g.
            ``(1, 2, 3)`` or ``(2,)``; must be consecutive.
        reason: for a block defined for one rank only, a short clause saying why,
            appended to the message.
    """
    if len(spatial_dims) == 1 and isinstance(x, torch.Tensor) and x.dim() != 2 + spatial_dims[0]:
        rank = spatial_dims[0]
        names = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[rank]
        why = f" ({reason})" if reason else ""
        raise InvalidInputError(
            f"{owner} is defined for {rank}D feature maps {names} only{why}; got a "
            f"{x.dim()}D tensor of shape {tuple(x.shape)}."
        )
    check_feature_map(
        x, channels, owner=owner, min_spatial=min(spatial_dims), max_spatial=max(spatial_dims)
    )
