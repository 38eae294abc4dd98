"""Times llama.cpp's own quantiser (llama_model_quantize, as `llama-quantize` runs it) from an
F16 GGUF to TYPE; prints the seconds. Used by `kiln bench export`.

    llama_quantize.py IN_F16.gguf OUT.gguf TYPE THREADS
"""
import sys
import time

import llama_cpp

FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q4_K": 15, "Q5_K_M": 17, "Q5_K": 17, "Q6_K": 18, "BF16": 32,
}

src, dst, ty, threads = sys.argv[1], sys.argv[2], sys.argv[3].upper(), int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = FTYPES[ty]
params.nthread = threads
start = time.perf_counter()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
elapsed = time.perf_counter() - start
if rc != 0:
    sys.exit(f"llama_model_quantize returned {rc}")
print(elapsed)
