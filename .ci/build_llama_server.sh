#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, from the llama.cpp sources vendored in llama-cpp-python's sdist
# (PyPI is the only registry this project reaches), and cache it in the user cache folder. The served-model
# tests (`make test-serve`) start it on 127.0.0.1. Prints the binary's path on stdout, the rest on stderr.
# Cost: about 10-20 minutes on 2 cores the first time; a cached build is reused (seconds).
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tracetailor/llama-server-$VERSION
BIN="$CACHE/bin/llama-server"
CONV="$CACHE/convert"
# the converter needs its `conversion/` package and gguf-py beside it (convert_hf_to_gguf.py imports both)
converter_ok() { [ -f "$CONV/convert_hf_to_gguf.py" ] && [ -d "$CONV/conversion" ] && [ -d "$CONV/gguf-py" ]; }
binary_ok() { [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; }
if binary_ok && converter_ok; then echo "$BIN"; exit 0; fi
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "no llama.cpp sources in the sdist at $src" >&2; exit 1; }
copy_converter() {
  rm -rf "$CONV.tmp" && mkdir -p "$CONV.tmp"
  cp "$src"/convert_hf_to_gguf*.py "$CONV.tmp/"
  cp -r "$src/conversion" "$src/gguf-py" "$CONV.tmp/"
  rm -rf "$CONV" && mv "$CONV.tmp" "$CONV"
}
if binary_ok; then copy_converter; echo "$BIN"; exit 0; fi  # an older cache without the full converter
echo "building llama-server from llama-cpp-python==$VERSION's sdist into $CACHE (minutes, once)" >&2
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$src" -B "$work/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$CACHE/bin"
cp "$work/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
# the converter that turns an HF checkpoint into GGUF (the miniature world's models), kept beside the binary
copy_converter
echo "built $BIN in $(( $(date +%s) - start ))s" >&2
echo "$BIN"
