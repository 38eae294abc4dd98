#!/usr/bin/env python3
"""Registers and spills of compiled kernels, from kiln's kernel cache (on the GPU machine).

CubeCL keeps the PTX it compiled in $KILN_CACHE_DIR/cubecl/kernels-*/cuda/*/ptx/*.cbor; this reads the
entries whose entry point starts with one of the given names and runs `ptxas -v` on each, which
says how many registers a thread uses (and so how many cubes fit on an SM) and whether any
spill to local memory.

    python3 bench/ptx_registers.py [--cache .kiln-cache] [--arch sm_90a] mma_forward_kernel mma_dq_kernel
"""
import argparse
import glob
import os
import re
import subprocess
import tempfile


def cbor_items(data):
    """Decodes a stream of CBOR items (the subset CubeCL's cache writes: maps, text, byte or
    integer arrays, unsigned integers)."""
    pos = 0

    def head(p):
        b = data[p]
        major, info = b >> 5, b & 31
        p += 1
        if info < 24:
            return major, info, p
        size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
        return major, int.from_bytes(data[p:p + size], "big"), p + size

    def item(p):
        major, value, p = head(p)
        if major == 0:
            return value, p
        if major == 1:
            return -1 - value, p
        if major in (2, 3):
            raw = data[p:p + value]
            return (raw if major == 2 else raw.decode("utf-8", "replace")), p + value
        if major == 4:
            out = []
            for _ in range(value):
                v, p = item(p)
                out.append(v)
            return out, p
        if major == 5:
            out = {}
            for _ in range(value):
                k, p = item(p)
                v, p = item(p)
                out[k if not isinstance(k, list) else bytes(k)] = v
            return out, p
        if major == 6:
            return item(p)
        if major == 7:
            return {20: False, 21: True, 22: None}.get(value, value), p
        raise ValueError(f"CBOR major type {major}")

    while pos < len(data):
        v, pos = item(pos)
        yield v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+", help="entry-point name prefixes")
    ap.add_argument("--cache", default=os.environ.get("KILN_CACHE_DIR", ".kiln-cache"))
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--ptxas", default=(glob.glob("/usr/local/cuda*/bin/ptxas") or ["ptxas"])[0])
    args = ap.parse_args()
    seen = set()
    for path in sorted(glob.glob(f"{args.cache}/cubecl/**/ptx/*.cbor", recursive=True)):
        for entry in cbor_items(open(path, "rb").read()):
            value = entry.get("value", {}) if isinstance(entry, dict) else {}
            name = value.get("entrypoint_name", "")
            if not any(name.startswith(n) for n in args.names):
                continue
            ptx = bytes(value["ptx"]).rstrip(b"\0")
            key = (name, len(ptx))
            if key in seen:
                continue
            seen.add(key)
            with tempfile.NamedTemporaryFile(suffix=".ptx") as f:
                f.write(ptx)
                f.flush()
                run = subprocess.run([args.ptxas, f"-arch={args.arch}", "-v", "-o", "/dev/null", f.name], capture_output=True, text=True)
            info = [l.strip() for l in (run.stdout + run.stderr).splitlines() if "registers" in l or "spill" in l]
            bound = re.search(rb"\.minnctapersm\s+(\d+)", ptx)
            cubes = f", at least {bound.group(1).decode()} cubes an SM" if bound else ""
            print(f"{name} (shared {value.get('shared_mem_bytes')} B, PTX {len(ptx)} B{cubes}): " + "; ".join(info))


if __name__ == "__main__":
    main()
