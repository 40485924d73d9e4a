"""Bit-packing of sub-byte integer codes into uint8 words.

Layout (what a kernel reads): codes live along the last axis. With `bits` in {2, 4} a byte
holds `per = 8 // bits` consecutive codes; code `j * per + i` sits in bits
`[i * bits, (i + 1) * bits)` of byte `j` (little-endian inside the byte: for INT4 the
*even* code is the low nibble). So `packed[..., j] = sum_i codes[..., j*per + i] << (i*bits)`
and a row of D codes packs into D * bits / 8 bytes. 8-bit codes are stored as they are.

    packed = pack(codes_uint8, bits=4)        # [..., D]      -> [..., D // 2]
    codes  = unpack(packed, bits=4, n=D)      # [..., D // 2] -> [..., D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PACK_BITS = (2, 4, 8)


def _check_bits(bits):
  if bits not in PACK_BITS:
    raise ValueError(f"bits={bits!r}; allowed: {PACK_BITS}")


def packed_width(n: int, bits: int) -> int:
  """Bytes that n codes of `bits` bits occupy (n must be a multiple of 8 // bits)."""
  _check_bits(bits)
  per = 8 // bits
  if n % per:
    raise ValueError(f"cannot pack {n} codes of {bits} bits into whole bytes; the last axis "
                     f"must be a multiple of {per}")
  return n // per


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs unsigned codes [..., n] (values < 2**bits) into uint8 [..., n * bits // 8]."""
  n = codes.shape[-1]
  width = packed_width(n, bits)
  codes = codes.astype(jnp.uint8)
  if bits == 8:
    return codes
  per = 8 // bits
  grouped = codes.reshape(*codes.shape[:-1], width, per)
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  mask = jnp.uint8((1 << bits) - 1)
  # Distinct bit ranges, so the sum is an OR.
  return jnp.sum((grouped & mask) << shifts, axis=-1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack`: uint8 [..., n * bits // 8] -> uint8 codes [..., n]."""
  width = packed_width(n, bits)
  if packed.shape[-1] != width:
    raise ValueError(f"packed last axis is {packed.shape[-1]}; expected {width} for n={n}, "
                     f"bits={bits}")
  packed = packed.astype(jnp.uint8)
  if bits == 8:
    return packed
  per = 8 // bits
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  mask = jnp.uint8((1 << bits) - 1)
  codes = (packed[..., None] >> shifts) & mask
  return codes.reshape(*packed.shape[:-1], n)
