"""Bit packing: n values of b bits each into ceil(n * b / 32) int32 words, and back.

Layout. The values form one bit stream, value after value, least significant bit first:
bit j of value i is stream bit i * b + j. Stream bit k is bit k % 32 of word k // 32, bit 31
being the int32 sign bit. So a value may straddle two words when b does not divide 32 (no
padding between values: 9-bit QSGD codes cost 9 bits, not 16), and only the last word is
padded, with zeros. The layout is defined by arithmetic, not by memory, so it is the same
on every host whatever its byte order.

Everything is vectorised tensor code on the values' device. Arithmetic runs in int64, where
bit 31 is an ordinary bit; the words are folded into [-2^31, 2^31) explicitly before the
cast to int32, so a set bit 31 comes back as a negative word and round-trips exactly.
"""

from __future__ import annotations

import torch

MAX_BITS = 32


def packed_words(numel: int, bits: int) -> int:
    """Words that ``numel`` values of ``bits`` bits fill: ceil(numel * bits / 32)."""
    _check_bits(bits)
    return -(-numel * bits // 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits per value must be in 1..{MAX_BITS}, got {bits}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The int32 words holding ``values`` (integers in [0, 2^bits)), ``bits`` bits each.

    Only the low ``bits`` bits of each value are stored (checking the range would cost a
    device sync on every bucket).
    """
    _check_bits(bits)
    flat = values.reshape(-1).to(torch.int64)
    device = flat.device
    n = flat.numel()
    words = packed_words(n, bits)
    # One uint8 per stream bit: n * bits bytes, the smallest exploded form.
    stream = torch.zeros(words * 32, dtype=torch.uint8, device=device)
    shifts = torch.arange(bits, dtype=torch.int64, device=device)
    stream[: n * bits] = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    # Bits to bytes, then bytes to words: small intermediates instead of 32 int64 per word.
    byte_weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=device)
    byte_values = (stream.view(-1, 8).to(torch.int32) * byte_weights).sum(1)
    word_shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
    unsigned = (byte_values.view(-1, 4).to(torch.int64) << word_shifts).sum(1)
    # [0, 2^32) -> [-2^31, 2^31): the same 32 bits in two's complement, so the cast below
    # is exact (casting an out-of-range int64 would be left to the backend).
    signed = unsigned - ((unsigned >> 31) << 32)
    return signed.to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` values (int64, in [0, 2^bits)) packed in the int32 ``words``."""
    _check_bits(bits)
    needed = packed_words(numel, bits)
    if words.dtype != torch.int32 or words.dim() != 1 or words.numel() < needed:
        raise ValueError(f"{numel} values of {bits} bits need {needed} int32 words, got "
                         f"{words.dtype} of shape {tuple(words.shape)}")
    device = words.device
    # The low 32 bits of the sign-extended int64 are the word's bits.
    unsigned = words[:needed].to(torch.int64) & 0xFFFFFFFF
    word_shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
    byte_values = ((unsigned.unsqueeze(1) >> word_shifts) & 0xFF).reshape(-1).to(torch.uint8)
    bit_shifts = torch.arange(8, dtype=torch.uint8, device=device)
    stream = (byte_values.unsqueeze(1) >> bit_shifts) & 1
    code = stream.reshape(-1)[: numel * bits].view(numel, bits).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64, device=device)
    return (code << shifts).sum(1)
