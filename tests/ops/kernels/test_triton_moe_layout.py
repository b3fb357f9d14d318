"""The "triton" kernel's word layout (triton_moe_details/layout.py) on the host: `prepare`'s
packing, the bit-level model of the GPU decode, and the PTX that the kernel inlines. The GPU
runs only the PTX, so the PTX is checked here by executing its text on a tiny interpreter."""
from __future__ import annotations

import re

import torch

from mxfp4_compile.numerics import decode_e2m1, unpack_codes
from mxfp4_compile.ops.kernels import triton_moe as tm
from mxfp4_compile.ops.kernels.triton_moe_details import layout, layout_fp8


def _bf16_halves(pattern: int) -> list[float]:
    """bf16x2 bit pattern -> [low half, high half] as float64 values."""
    halves = torch.tensor([pattern & 0xFFFF, pattern >> 16], dtype=torch.int32).to(torch.int16)
    return halves.view(torch.bfloat16).double().tolist()


def test_packed_words_decode_to_every_code_at_its_column():
    g = torch.Generator().manual_seed(3)
    # every byte value appears: all 16 codes in both nibbles, at every column of a chunk
    packed = torch.randint(0, 256, (2, 5, 64), dtype=torch.uint8, generator=g)  # K = 128
    packed[0, 0] = torch.arange(64, dtype=torch.uint8)
    packed[0, 1] = torch.arange(64, 128, dtype=torch.uint8)
    packed[1, 0] = torch.arange(128, 192, dtype=torch.uint8)
    packed[1, 1] = torch.arange(192, 256, dtype=torch.uint8)
    values = decode_e2m1(unpack_codes(packed)).double()  # [E, N, K]
    words = tm._pack_words(packed).view(torch.int32)  # [E, N, K/8]
    assert words.shape == (2, 5, 16)
    for e in range(2):
        for n in range(5):
            for w in range(16):
                chunk, c = divmod(w, 4)
                pats = layout.decode_word(int(words[e, n, w]) & 0xFFFFFFFF)
                got = [v * 2.0 ** 126 for pat in pats for v in _bf16_halves(pat)]
                want = values[e, n, [32 * chunk + col for col in tm._WORD_COLUMNS[c]]]
                assert got == want.tolist(), (e, n, w)
                # -0 keeps its sign (code 8): the bf16 sign bit is the code's
                assert [torch.tensor(v).signbit().item() for v in got] == want.signbit().tolist()


def _exec_ptx(text: str, regs: dict[str, int], on_fma=None) -> dict[str, int]:
    """Executes the integer part of a decode PTX on host ints (mov, and, or, shifts, rotates,
    prmt); regs: the operands' values by name ("$8", ...). Each fma.rn.bf16x2 goes to
    on_fma(its operands, the registers). -> every register after the last line."""
    regs = dict(regs)

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    for line in text.splitlines():
        m = re.match(r"(\S+)\s+(.*);$", line.strip())
        if not m or m.group(1) == ".reg":
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if op == "mov.b32" and args[0].startswith("{"):
            continue  # the split into the two bf16 results
        if op == "fma.rn.bf16x2":
            on_fma(args, regs)
            continue
        a = [val(x) for x in args[1:]]
        if op == "mov.b32":
            out = a[0]
        elif op == "and.b32":
            out = a[0] & a[1]
        elif op == "or.b32":
            out = a[0] | a[1]
        elif op == "shr.b32":
            out = a[0] >> a[1] if a[1] < 32 else 0
        elif op == "shl.b32":
            out = (a[0] << a[1]) & 0xFFFFFFFF if a[1] < 32 else 0
        elif op == "shf.l.wrap.b32":
            assert args[1] == args[2], "a rotate shifts a register into itself"
            out = layout.rotl(a[0], a[2])
        elif op == "prmt.b32":
            out = layout_fp8._prmt(a[0], a[1], a[2])
        else:
            raise AssertionError(f"unexpected PTX op {op!r}")
        regs[args[0]] = out
    return regs


def _run_ptx(text: str, word: int) -> list[int]:
    """Executes the bf16 decode PTX on `word` ($8); returns the 4 bf16x2 registers it hands to
    the fma (the scale multiply, which the kernel tests check on real data)."""
    before_fma = []

    def fma(args, regs):
        assert args[1:] == [args[0], "$9", "z"] and regs["z"] == 0x80008000
        before_fma.append(regs[args[0]])

    _exec_ptx(text, {"$8": word}, fma)
    return before_fma


def test_dequant_ptx_matches_the_layout_model():
    g = torch.Generator().manual_seed(4)
    words = torch.randint(0, 2 ** 32, (2000,), dtype=torch.int64, generator=g).tolist()
    for w in words + [0, 0xFFFFFFFF, 0x80000000, 1]:
        assert _run_ptx(layout.DEQUANT_ASM, w) == layout.decode_word(w), hex(w)
    # outputs in register order, each pair written once
    outs = re.findall(r"mov\.b32 \{\$(\d), \$(\d)\}", layout.DEQUANT_ASM)
    assert outs == [(str(2 * j), str(2 * j + 1)) for j in range(4)]



def test_tile_rows_puts_each_byte_where_the_kernel_reads_it():
    g = torch.Generator().manual_seed(5)
    E, N, K = 2, 48, 2048  # 32 blocks of 64 codes per row: K/32 = 64 scale bytes, K/2 = 1024
    e, n = torch.arange(E)[:, None, None], torch.arange(N)[None, :, None]
    # _kernels._tiled_rows + _tiled_cols: 32 bytes a row per block (8 words), or 2 scale bytes
    for nb, block in ((K // 2, 32), (K // 32, 2)):
        t = torch.randint(0, 256, (E, N, nb), dtype=torch.uint8, generator=g)
        tiled = tm._tile_rows(t, block)
        assert tiled.shape == (E, N // 16, nb // block, 16, block) and tiled.dtype == torch.uint8
        assert tiled.is_contiguous()
        b = torch.arange(nb)[None, None, :]
        at = e * N * nb + (n // 16) * 16 * nb + (b // block) * 16 * block + (n % 16) * block \
            + b % block
        assert torch.equal(tiled.reshape(-1)[at], t)
