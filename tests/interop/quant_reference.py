#!/usr/bin/env python3
"""Quantise (or dequantise) with the REAL ggml C code, to check kiln's src/quant byte for byte.

ggml comes from the llama-cpp-python package (`pip install llama-cpp-python`), which ships
libggml-base.so; it is called through ctypes:

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row,
                               const float * imatrix);

with imatrix = NULL, which for every type kiln writes runs ggml's `quantize_row_*_ref`
(what `llama-quantize` does without an importance matrix). Dequantisation calls the exported
`dequantize_row_*` / `ggml_fp16_to_fp32_row` / `ggml_bf16_to_fp32_row`.

Without llama-cpp-python, `--backend gguf` uses gguf-py's numpy ports (`gguf.quants`), which
quantise only the legacy types and BF16 but dequantise every type.

MLX: with --mlx-bits B (and --group-size G), the rows are instead quantised with MLX's affine
`mx.quantize(w, group_size=G, bits=B)` on the CPU (pip install "mlx[cpu]"), in float32 so that
scales and biases stay float32; OUT.weight (uint32), OUT.scales and OUT.biases (float32) are
written, all little-endian. With --dequantize, `--input PREFIX` reads those three back and
writes `mx.dequantize(...)` as float32 to --out.

Examples:
    # 8 random N(0,1) rows of 1024, seed 3, to Q4_K bytes:
    quant_reference.py --type Q4_K --rows 8 --cols 1024 --seed 3 --out q.bin [--save-input x.f32]
    # rows of little-endian f32 from a file:
    quant_reference.py --type Q6_K --input x.f32 --cols 1024 --out q.bin
    # back to f32:
    quant_reference.py --type Q6_K --dequantize --input q.bin --out y.f32
    # MLX 4-bit, groups of 64:
    quant_reference.py --mlx-bits 4 --group-size 64 --input x.f32 --cols 1024 --out mlxq
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys

import numpy as np

# ggml's enum ggml_type values and (block size, bytes per block), from ggml.h / ggml-common.h.
TYPES = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}

DEQUANT_SYMBOL = {
    "Q4_0": "dequantize_row_q4_0",
    "Q4_1": "dequantize_row_q4_1",
    "Q5_0": "dequantize_row_q5_0",
    "Q5_1": "dequantize_row_q5_1",
    "Q8_0": "dequantize_row_q8_0",
    "Q4_K": "dequantize_row_q4_K",
    "Q5_K": "dequantize_row_q5_K",
    "Q6_K": "dequantize_row_q6_K",
    "F16": "ggml_fp16_to_fp32_row",
    "BF16": "ggml_bf16_to_fp32_row",
}


def find_libggml(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        import llama_cpp  # noqa: F401  (only to find its directory)
    except ImportError as e:
        sys.exit(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python, or pass --lib or --backend gguf")
    base = os.path.dirname(llama_cpp.__file__)
    for pattern in ("lib/libggml-base.so", "lib/libggml-base.*", "lib/libggml.so", "**/libggml-base*"):
        hits = sorted(glob.glob(os.path.join(base, pattern), recursive=True))
        if hits:
            return hits[0]
    sys.exit(f"no libggml-base in {base}")


class Ggml:
    def __init__(self, path: str):
        # RTLD_GLOBAL so that libggml.so / libggml-cpu.so, if pulled in, resolve against it.
        self.lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        self.path = path
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_quantize_init.restype = None
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, name: str, x: np.ndarray) -> bytes:
        type_id, block, size = TYPES[name]
        rows, cols = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        row_size = self.lib.ggml_row_size(type_id, cols)
        assert row_size == cols // block * size, (row_size, cols, block, size)
        out = np.zeros(rows * row_size, dtype=np.uint8)
        self.lib.ggml_quantize_init(type_id)
        # In chunks of rows, as llama-quantize does (it is the same bytes either way).
        chunk = max(1, (1 << 20) // cols)
        for r in range(0, rows, chunk):
            n = min(chunk, rows - r)
            written = self.lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, r * cols, n, cols, None)
            assert written == n * row_size, (written, n, row_size)
        return out.tobytes()

    def dequantize(self, name: str, data: bytes) -> np.ndarray:
        type_id, block, size = TYPES[name]
        if len(data) % size:
            sys.exit(f"{len(data)} bytes is not a whole number of {name} blocks ({size} bytes)")
        n = len(data) // size * block
        if name == "F32":
            return np.frombuffer(data, dtype="<f4").copy()
        src = np.frombuffer(data, dtype=np.uint8).copy()
        out = np.zeros(n, dtype=np.float32)
        f = getattr(self.lib, DEQUANT_SYMBOL[name])
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        f(src.ctypes.data, out.ctypes.data, n)
        return out


class GgufPy:
    """gguf-py's numpy ports of ggml's reference functions."""

    def __init__(self):
        import gguf
        import gguf.quants

        self.gguf = gguf
        self.path = os.path.dirname(gguf.__file__)

    def qtype(self, name):
        return self.gguf.GGMLQuantizationType[name]

    def quantize(self, name: str, x: np.ndarray) -> bytes:
        q = self.gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), self.qtype(name))
        return np.ascontiguousarray(q).tobytes()

    def dequantize(self, name: str, data: bytes) -> np.ndarray:
        raw = np.frombuffer(data, dtype=np.uint8)
        if name == "F32":
            return raw.view("<f4").copy()
        if name == "F16":
            return raw.view("<f2").astype(np.float32)
        return self.gguf.quants.dequantize(raw.reshape(1, -1), self.qtype(name)).astype(np.float32).ravel()


def mlx_quantize(x: np.ndarray, bits: int, group_size: int, out: str) -> None:
    import mlx.core as mx

    w, scales, biases = mx.quantize(mx.array(x, dtype=mx.float32), group_size=group_size, bits=bits, mode="affine")
    mx.eval(w, scales, biases)
    np.asarray(w, dtype=np.uint32).astype("<u4").tofile(out + ".weight")
    np.asarray(scales, dtype=np.float32).astype("<f4").tofile(out + ".scales")
    np.asarray(biases, dtype=np.float32).astype("<f4").tofile(out + ".biases")


def mlx_dequantize(prefix: str, rows: int, cols: int, bits: int, group_size: int, out: str) -> None:
    import mlx.core as mx

    w = np.fromfile(prefix + ".weight", dtype="<u4").reshape(rows, cols * bits // 32)
    scales = np.fromfile(prefix + ".scales", dtype="<f4").reshape(rows, cols // group_size)
    biases = np.fromfile(prefix + ".biases", dtype="<f4").reshape(rows, cols // group_size)
    y = mx.dequantize(mx.array(w), mx.array(scales), mx.array(biases), group_size=group_size, bits=bits, mode="affine")
    np.asarray(y, dtype=np.float32).astype("<f4").tofile(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", type=str.upper, choices=sorted(TYPES), help="ggml type name (case-insensitive)")
    p.add_argument("--mlx-bits", type=int, help="use MLX affine quantisation with this many bits instead of ggml")
    p.add_argument("--group-size", type=int, default=64, help="MLX group size (default 64)")
    p.add_argument("--input", help="quantise: little-endian f32 rows; --dequantize: the quantised bytes")
    p.add_argument("--rows", type=int, help="without --input: number of random N(0,1) rows")
    p.add_argument("--cols", type=int, help="values per row (quantise mode)")
    p.add_argument("--seed", type=int, default=0, help="seed for random rows (numpy default_rng)")
    p.add_argument("--save-input", help="also write the generated rows (little-endian f32) here")
    p.add_argument("--out", required=True, help="where to write the result")
    p.add_argument("--dequantize", action="store_true", help="turn --input bytes back into little-endian f32")
    p.add_argument("--backend", choices=["ggml", "gguf"], default="ggml", help="real ggml via llama-cpp-python (default) or gguf-py's numpy port")
    p.add_argument("--lib", help="path of libggml-base.so (default: the one inside llama-cpp-python)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()

    if a.mlx_bits is not None:
        if not a.cols or not a.input:
            sys.exit("MLX mode needs --input and --cols")
        if a.dequantize:
            if not a.rows:
                sys.exit("MLX --dequantize needs --rows")
            mlx_dequantize(a.input, a.rows, a.cols, a.mlx_bits, a.group_size, a.out)
        else:
            x = np.fromfile(a.input, dtype="<f4").reshape(-1, a.cols)
            mlx_quantize(x, a.mlx_bits, a.group_size, a.out)
        return
    if not a.type:
        sys.exit("--type is required (or --mlx-bits for MLX)")

    backend = Ggml(find_libggml(a.lib)) if a.backend == "ggml" else GgufPy()
    if a.verbose:
        print(f"backend: {a.backend} ({backend.path})", file=sys.stderr)

    if a.dequantize:
        if not a.input:
            sys.exit("--dequantize needs --input")
        with open(a.input, "rb") as f:
            data = f.read()
        y = backend.dequantize(a.type, data)
        y.astype("<f4").tofile(a.out)
        return

    if not a.cols or a.cols <= 0:
        sys.exit("--cols is required")
    _, block, _ = TYPES[a.type]
    if a.cols % block:
        sys.exit(f"a row of {a.cols} values is not a multiple of the {a.type} block size {block}")
    if a.input:
        x = np.fromfile(a.input, dtype="<f4")
        if x.size % a.cols:
            sys.exit(f"{x.size} values in {a.input} do not split into rows of {a.cols}")
        x = x.reshape(-1, a.cols)
    else:
        if not a.rows:
            sys.exit("give --input FILE or --rows N")
        x = np.random.default_rng(a.seed).standard_normal((a.rows, a.cols), dtype=np.float32)
        if a.save_input:
            x.astype("<f4").tofile(a.save_input)
    with open(a.out, "wb") as f:
        f.write(backend.quantize(a.type, x))


if __name__ == "__main__":
    main()
