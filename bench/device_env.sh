# Sourced by the scripts that run on the GPU machine (carry .devcarry, .whl, .kiln-cache.tar.xz):
# the kiln binary at $KILN, peft on PYTHONPATH, the kernel cache, and cuBLAS on the search path.
source .devcarry/prelude.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
# Compiled kernels (PTX) and autotune results outlive the call: the directory is git-ignored, and
# ignored files stay on a warm device machine between calls. Scripts put a copy in $OUT so the
# next machine can start warm too (carry it back as .kiln-cache.tar.xz).
export KILN_CACHE_DIR="$PWD/.kiln-cache" CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
[ -f .kiln-cache.tar.xz ] && [ ! -d .kiln-cache ] && tar xJf .kiln-cache.tar.xz
# kiln's dense products on CUDA go to cuBLAS (kernels/src/cublas.rs), loaded at run time by name;
# PyTorch's wheels carry a libcublas: put its folder on the search path.
cublas=$(find $(python3 -c 'import site; print(" ".join(site.getsitepackages()))') /usr/local/cuda*/lib64 -name 'libcublas.so*' ! -name '*Lt*' 2>/dev/null | head -1)
[ -n "$cublas" ] && export LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && echo "cuBLAS: $cublas"
