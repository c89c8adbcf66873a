#!/usr/bin/env python3
"""Writes tests/data/dequant_goldens.bin: (de)quantization goldens from the PyPI `gguf` package.

The `gguf` package (llama.cpp's own Python GGUF library) is the independent reference: its
numpy (de)quantizers are written to be bit-exact with ggml-quants.c. This script is the only
way the golden file is produced; never edit it by hand.

Run (from the repository root):
    python3 tools/gen_dequant_goldens.py [MODEL.gguf] [-o tests/data/dequant_goldens.bin]
MODEL defaults to $KVLM_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf, or
~/.cache/kvlm/models/SmolLM2-135M-Instruct.Q4_1.gguf when KVLM_MODELS is unset.
Needs: python3 with `gguf` (tested with 0.19.0) and `numpy`.

File format, all little-endian:
    header:  char magic[4] = "KVDG"; u32 version = 1; u32 n_records
    record:  u32 kind            0 = dequantize: raw bytes -> expected f32 values
                                 1 = quantize:   f32 values -> expected raw bytes
                                 2 = layout:     one block of type_id: n = elements per block,
                                                 n_bytes = bytes per block (raw and values 0)
             u32 name_len; char name[name_len]   (tensor name + row, or a synthetic label)
             u32 type_id                          (GGML type number, = kvlm::DType)
             u32 n                                (elements in the row)
             u32 n_bytes; u8 raw[n_bytes]         (the row in type_id's layout)
             f32 values[n]
For kind 0, `values` is gguf.quants.dequantize(raw); for kind 1, `raw` is
gguf.quants.quantize(values). Every quantize record is followed by a dequantize record of the
same bytes, so the synthetic types are covered by both directions.

Every type kvlm computes with has a dequantize record of real-looking data (rows of the model,
gguf's own quantization of random values, or random codes under small scales where gguf has no
quantizer) and one named "hostile/<TYPE>": blocks a broken or malicious file may hold (zero,
negative-zero, subnormal, largest-finite, infinite and NaN f16 scales and mins, sub-block scales
at their extreme encodings, all codes zero under an infinite scale; NaN/inf bit patterns for the
plain types). kvlm's dequantization must give gguf's values bit for bit, NaN where gguf has NaN.
"""

import argparse
import os
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

KIND_DEQUANT = 0
KIND_QUANT = 1
KIND_LAYOUT = 2

# Rows taken from the default model: a few of each type it contains.
MODEL_TENSORS = [
    "blk.0.attn_q.weight",     # Q4_1, 576 cols
    "blk.29.ffn_down.weight",  # Q4_1, 1536 cols
    "token_embd.weight",       # Q8_0, 576 cols
    "blk.0.attn_norm.weight",  # F32, one row of 576
]


def default_model() -> str:
    d = os.environ.get("KVLM_MODELS") or os.path.expanduser("~/.cache/kvlm/models")
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


class Writer:
    def __init__(self):
        self.records = []

    def add(self, kind: int, name: str, qtype: T, raw: np.ndarray, values: np.ndarray):
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        assert values.size % bs == 0 and raw.size == values.size // bs * ts, name
        nb = name.encode()
        self.records.append(
            struct.pack("<II", kind, len(nb)) + nb
            + struct.pack("<III", int(qtype), values.size, raw.size)
            + raw.tobytes() + values.astype("<f4").tobytes())

    def dequant(self, name: str, qtype: T, raw: np.ndarray):
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        self.add(KIND_DEQUANT, name, qtype, raw, gguf.quants.dequantize(raw, qtype))

    def quant(self, name: str, qtype: T, values: np.ndarray):
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        raw = np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(-1)
        self.add(KIND_QUANT, name, qtype, raw, values)
        self.dequant(name + "/dequant", qtype, raw)

    def layout(self, qtype: T):
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        self.add(KIND_LAYOUT, qtype.name, qtype, np.zeros(ts, np.uint8), np.zeros(bs, np.float32))

    def save(self, path: str):
        with open(path, "wb") as f:
            f.write(b"KVDG" + struct.pack("<II", 1, len(self.records)))
            for r in self.records:
                f.write(r)


def model_records(w: Writer, model: str):
    reader = gguf.GGUFReader(model)
    by_name = {t.name: t for t in reader.tensors}
    for name in MODEL_TENSORS:
        if name not in by_name:
            sys.exit(f"{model}: no tensor '{name}'; is this SmolLM2-135M-Instruct.Q4_1.gguf?")
        t = by_name[name]
        data = np.asarray(t.data)
        if data.ndim == 1:  # a 1-D tensor is one row
            data = data.reshape(1, -1)
        n_rows = data.shape[0]
        for r in sorted({0, 1, n_rows // 2, n_rows - 1} & set(range(n_rows))):
            w.dequant(f"{name}[{r}]", t.tensor_type, data[r])


def synthetic_records(w: Writer):
    rng = np.random.default_rng(20240611)
    n = 256

    def vec(scale: float) -> np.ndarray:
        return (rng.standard_normal(n) * scale).astype(np.float32)

    # Edge blocks for the block quantizers: all zeros (d = 0, so id = 0), a constant block
    # (Q4_1: max == min), a block whose largest-magnitude element is negative (Q4_0 keeps that
    # sign in d), a linear ramp, and large-magnitude blocks.
    edge = np.zeros(n, np.float32)
    edge[32:64] = 0.75
    edge[64:96] = rng.standard_normal(32).astype(np.float32) * 0.01
    edge[70] = -3.0
    edge[96:128] = np.linspace(-1, 1, 32, dtype=np.float32)
    edge[128:] = vec(100.0)[128:]

    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        for i, scale in enumerate((0.02, 1.0)):
            w.quant(f"random{i}/{qtype.name}", qtype, vec(scale))
        w.quant(f"edge/{qtype.name}", qtype, edge)

    # F16: ordinary values, values around fp16's subnormal and overflow thresholds, and exact
    # ties between two fp16 values (round-to-nearest-even).
    f16 = vec(3.0)
    f16[:16] = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, -1e6, 6.1e-5, 5.96e-8,
                         2.98e-8, 2.99e-8, 1e-10, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                         np.inf], dtype=np.float32)
    w.quant("random/F16", T.F16, f16)
    bf16 = vec(3.0)
    bf16[:8] = np.array([0.0, -0.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3e38, -1e-39, np.inf,
                         -np.inf], dtype=np.float32)
    w.quant("random/BF16", T.BF16, bf16)
    w.quant("random/F32", T.F32, vec(1.0))

    # Q6_K: gguf (0.19) has no Q6_K quantizer, so the raw blocks are random bytes with a sane f16 super
    # scale d (random ql, qh and int8 sub-block scales cover every 6-bit code and scale sign).
    bs, ts = gguf.GGML_QUANT_SIZES[T.Q6_K]
    n_blocks = 3
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    d = np.array([1e-3, 0.02, -5e-4], dtype=np.float16)
    raw[:, ts - 2:] = d.view(np.uint8).reshape(n_blocks, 2)
    w.dequant("random_bytes/Q6_K", T.Q6_K, raw)
    # Q4_0 from random bytes too: every nibble and a negative scale.
    bs, ts = gguf.GGML_QUANT_SIZES[T.Q4_0]
    raw = rng.integers(0, 256, size=(4, ts), dtype=np.uint8)
    raw[:, :2] = np.array([0.5, -0.125, 3e-3, 0.0], dtype=np.float16).view(np.uint8).reshape(4, 2)
    w.dequant("random_bytes/Q4_0", T.Q4_0, raw)


# Byte offsets of each block type's f16 scale fields (super-block scale first, then the scale of
# the mins where there is one) and of its sub-block scale bytes (start, end), from the GGML block
# structs (src/tensor/dtype.h mirrors them).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_XS: [0],
}
SUB_SCALES = {
    T.Q2_K: (0, 16), T.Q3_K: (96, 108), T.Q4_K: (4, 16), T.Q5_K: (4, 16), T.Q6_K: (192, 208),
    T.IQ4_XS: (2, 8),
}
# Types gguf can quantize but kvlm cannot (so no quantize records): their goldens dequantize
# gguf's own quantization of random data, i.e. blocks as a real file has them.
GGUF_QUANTIZED = (T.Q5_0, T.Q5_1)
# Types gguf (0.19) has no quantizer for: real-looking rows are random codes and sub-block scales
# under a small positive f16 super-block scale (and min scale), as a quantizer writes them.
RANDOM_BLOCKS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
# f16 bit patterns for hostile scales: zero, negative zero, the smallest subnormal, the largest
# finite of either sign, both infinities, the default NaN, a NaN with a payload, a negative NaN.
HOSTILE_F16 = [0x0000, 0x8000, 0x0001, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00]


def set_f16(block: np.ndarray, offset: int, bits: int):
    block[offset:offset + 2] = np.array([bits], dtype="<u2").view(np.uint8)


def realistic_blocks(rng, qtype: T, n_blocks: int) -> np.ndarray:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for b in range(n_blocks):
        for off in F16_FIELDS[qtype]:
            scale = rng.uniform(1e-4, 2e-2) * (1 if qtype not in (T.IQ4_NL, T.Q6_K) or b % 2 else -1)
            set_f16(raw[b], off, int(np.float16(scale).view(np.uint16)))
    return raw


def hostile_blocks(rng, qtype: T) -> np.ndarray:
    """Blocks a broken or malicious file may hold, each beside random codes: every f16 scale field
    set to each HOSTILE_F16 pattern; only the last field (the mins' scale) non-finite; and, where
    there are sub-block scales, all of them at their smallest or largest encoding, under a normal
    and an infinite super-block scale (inf * 0 sub-scale or code gives NaN). Also all codes zero
    under an infinite scale."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    fields = F16_FIELDS[qtype]
    normal = int(np.float16(0.01).view(np.uint16))
    blocks = []

    def block(scales: list, sub: int | None = None, codes: int | None = None) -> np.ndarray:
        b = rng.integers(0, 256, size=ts, dtype=np.uint8)
        if codes is not None:
            b[:] = codes
        if sub is not None and qtype in SUB_SCALES:
            lo, hi = SUB_SCALES[qtype]
            b[lo:hi] = sub
        for off, bits in zip(fields, scales):
            set_f16(b, off, bits)
        return b

    for bits in HOSTILE_F16:
        blocks.append(block([bits] * len(fields)))
    if len(fields) == 2:
        for bits in (0x7C00, 0x7E00, 0xFBFF):
            blocks.append(block([normal, bits]))
    if qtype in SUB_SCALES:
        # 0x00 and 0xFF are every scale's smallest and largest 6-bit (or 4-bit) encoding; Q6_K's
        # int8 scales add -128 and 127.
        for sub in (0x00, 0xFF) + ((0x80, 0x7F) if qtype == T.Q6_K else ()):
            for scale in (normal, 0x7C00):
                blocks.append(block([scale] * len(fields), sub=sub))
    blocks.append(block([0x7C00] * len(fields), codes=0))
    return np.stack(blocks)


def block_type_records(w: Writer):
    """Every compute block type kvlm has only a reference kernel for, plus hostile blocks of the
    others: real-looking rows and hostile blocks, dequantized by gguf."""
    rng = np.random.default_rng(20261207)
    for qtype in GGUF_QUANTIZED:
        for i, scale in enumerate((0.02, 1.0)):
            values = (rng.standard_normal(256) * scale).astype(np.float32)
            w.dequant(f"gguf_quantized{i}/{qtype.name}", qtype, gguf.quants.quantize(values, qtype))
    for qtype in RANDOM_BLOCKS:
        bs, _ = gguf.GGML_QUANT_SIZES[qtype]
        w.dequant(f"realistic/{qtype.name}", qtype, realistic_blocks(rng, qtype, max(2, 512 // bs)))
    for qtype in F16_FIELDS:
        w.dequant(f"hostile/{qtype.name}", qtype, hostile_blocks(rng, qtype))
    # Plain types: NaN and inf bit patterns straight from a file (F16 and BF16 NaNs with and
    # without payloads, both signs).
    f16 = np.array(HOSTILE_F16 + [0x7FFF, 0xFFFF], dtype="<u2")
    w.dequant("hostile/F16", T.F16, f16)
    bf16 = np.array([0x7FC0, 0xFFC0, 0x7F81, 0x7F80, 0xFF80, 0x0001, 0x8000, 0x7F7F], dtype="<u2")
    w.dequant("hostile/BF16", T.BF16, bf16)
    f32 = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x00000001,
                    0x80000000, 0x7F7FFFFF], dtype="<u4")
    w.dequant("hostile/F32", T.F32, f32)


def layout_records(w: Writer):
    """Every type gguf knows, so that kvlm parses (and `kvlm inspect` lists) any file gguf can
    write. Not Q8_1: gguf's size for it (40 bytes, from when its d and s were f32) is stale;
    ggml's block_q8_1 has been 36 bytes since they became f16, and it is an activation type that
    no model file holds."""
    for qtype in T:
        if qtype in gguf.GGML_QUANT_SIZES and qtype != T.Q8_1:
            w.layout(qtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=default_model())
    ap.add_argument("-o", "--output", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "dequant_goldens.bin"))
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"{args.model}: not found; run scripts/fetch-model.sh or pass the path")

    # The F16 cases overflow to inf on purpose, and the hostile blocks multiply inf by 0.
    np.seterr(over="ignore", invalid="ignore")
    w = Writer()
    model_records(w, args.model)
    synthetic_records(w)
    block_type_records(w)
    layout_records(w)
    w.save(args.output)
    size = os.path.getsize(args.output)
    print(f"wrote {len(w.records)} records, {size} bytes to {os.path.normpath(args.output)}")
    assert size < 400_000


if __name__ == "__main__":
    main()
