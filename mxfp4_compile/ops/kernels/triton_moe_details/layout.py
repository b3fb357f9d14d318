"""Where `prepare` puts each e2m1 code's bits inside a 32-bit word, and the PTX that decodes a
word to 4 bf16 pairs. Pure Python (no triton): triton_moe.prepare packs with it, _kernels decodes.

A bf16 whose bits 8..6 (the exponent's two low bits and the mantissa's top bit) hold a code's
(e1, e0, m) and whose bit 15 holds its sign equals the code's value * 2**-126 (e == 0 gives the
subnormal 0.5 * 2**-126); one bf16x2 multiply by a power of two built from the block's biased
scale byte (the 2**126 and the accumulator's shift are folded into it: STORED_SCALE_OFFSET)
finishes it.
Element t = 2j + lane of a word goes to half `lane` of bf16x2 register j, built as

    reg_j = (rotl(word, MAG_ROT) & 0x01C001C0) | (rotl(word, SIGN_ROT) & 0x80008000)

with (MAG_ROT, SIGN_ROT) = ROTATIONS[j]. Where both rotations agree this is one rotate and one AND
with 0x81C081C0, and a rotation of 0 costs nothing: 5 rotates + 6 logic ops + 4 multiplies = 15
instructions per word (sm90 SASS), against 19 for the earlier layout (each code a nibble: two
shifts and two masks per register). No 4 shared rotations can serve all registers with one
mask each: 4 copies of the bit pattern {6, 7, 8, 15} never tile 16 positions (checked
exhaustively), so two registers need a second rotate.
"""
from __future__ import annotations

from ....formats import E8M0_BIAS

ROTATIONS = ((0, 4), (3, 3), (6, 6), (9, 5))  # per bf16x2 register j: (MAG_ROT, SIGN_ROT)

# The scale multiplier is 2**(s - 1 - ACC_SHIFT) for e8m0 byte s (the decoded pair is
# value * 2**-126; the accumulator is multiplied by 2**ACC_SHIFT at the end), so its bf16
# exponent field is s + STORED_SCALE_OFFSET: `prepare` stores that offset byte. The field must
# stay a finite exponent (<= 254): scales up to MAX_SCALE are exact, 255 (NaN) is kept as an
# infinity.
ACC_SHIFT = 64
STORED_SCALE_OFFSET = E8M0_BIAS - 1 - ACC_SHIFT
MAX_SCALE = 254 - STORED_SCALE_OFFSET
_MAG_MASK = 0x01C001C0
_SIGN_MASK = 0x80008000


def _positions():
    mag, sign = [], []
    for t in range(8):
        (a, b), lane = ROTATIONS[t // 2], t % 2
        mag.append((6 + 16 * lane - a) % 32)  # the lowest of the code's 3 magnitude bits
        sign.append((15 + 16 * lane - b) % 32)
    return tuple(mag), tuple(sign)


# word bit of element t's magnitude bits (MAG_AT[t] .. MAG_AT[t] + 2) and sign bit (SIGN_AT[t])
MAG_AT, SIGN_AT = _positions()
# every bit used once, no magnitude field wrapping past bit 31 (the decoders read 3 adjacent bits)
assert sorted([p + i for p in MAG_AT for i in range(3)] + list(SIGN_AT)) == list(range(32))


def rotl(word: int, r: int) -> int:
    """32-bit rotate left (the PTX `shf.l.wrap`), for host-side checks."""
    return ((word << r) | (word >> (32 - r))) & 0xFFFFFFFF if r else word


def decode_word(word: int) -> list[int]:
    """The 4 bf16x2 bit patterns (before the scale multiply) the PTX below builds from `word`:
    the host-side model of DEQUANT_ASM, for tests."""
    return [(rotl(word, a) & _MAG_MASK) | (rotl(word, b) & _SIGN_MASK) for a, b in ROTATIONS]


def _dequant_asm() -> str:
    """PTX for `tl.inline_asm_elementwise`: $8 the word, $9 the bf16x2 scale multiplier, $10 an
    ordering token (unused); $0..$7 the 8 bf16 results. fma with -0 (not mul.bf16x2, sm90 only)
    keeps sm80 support and a code of -0 negative."""
    lines = ["{", ".reg .b32 t, u, o, z;", "mov.b32 z, 0x80008000;"]
    for j, (a, b) in enumerate(ROTATIONS):
        src = "t" if a else "$8"
        if a:
            lines.append(f"shf.l.wrap.b32 t, $8, $8, {a};")
        if a == b:
            lines.append(f"and.b32 o, {src}, {_MAG_MASK | _SIGN_MASK:#010x};")
        else:
            lines.append(f"and.b32 o, {src}, {_MAG_MASK:#010x};")
            lines.append(f"shf.l.wrap.b32 u, $8, $8, {b};" if b else "mov.b32 u, $8;")
            lines.append(f"and.b32 u, u, {_SIGN_MASK:#010x};")
            lines.append("or.b32 o, o, u;")
        lines.append("fma.rn.bf16x2 o, o, $9, z;")
        lines.append(f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, o;")
    lines.append("}")
    return "\n".join(lines)


DEQUANT_ASM = _dequant_asm()
