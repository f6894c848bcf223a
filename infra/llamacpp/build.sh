#!/usr/bin/env bash
# Build llama.cpp's Python binding and command-line tools from requirements-llamacpp.lock and
# install them into .venv/llamacpp: lib/ (the binding), bin/ (llama-perplexity, llama-quantize,
# llama-imatrix, llama-bench, llama-completion and their libraries), llama.cpp/ (its source: the
# converter and the vocabulary files its tests use).
#
# The build takes about 10 minutes on 2 cores, so its result is kept in a cache outside the
# checkout (FRUGALFLOW_CACHE, default ~/.cache/frugalflow), keyed by the lock and the CMake flags:
# a second clone on the same machine installs in seconds. Usage: infra/llamacpp/build.sh VENV_PYTHON
set -euo pipefail
python=${1:?usage: build.sh VENV_PYTHON}
here=$(cd "$(dirname "$0")/../.." && pwd)
lock=$here/requirements-llamacpp.lock
dest=$here/.venv/llamacpp
# LLAVA_BUILD=OFF: with it on, CMake stops (the multimodal folder is added twice).
flags="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
key=$( (cat "$lock"; echo "$flags"; "$python" -c 'import sys; print(sys.version)'; uname -m) | sha256sum | cut -c1-16)
cache=${FRUGALFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/frugalflow}/llamacpp-$key

if [ ! -f "$cache/.built" ]; then
  echo "llamacpp: building llama-cpp-python from source into $cache (about 10 minutes on 2 cores)"
  rm -rf "$cache" && mkdir -p "$cache/src"
  "$python" -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$lock" -d "$cache/sdist"
  tar xzf "$cache"/sdist/llama_cpp_python-*.tar.gz -C "$cache/src" --strip-components=1
  # scikit-build-core builds in $cache/build (not a temporary folder), so the tools stay there
  CMAKE_ARGS="$flags" SKBUILD_BUILD_DIR="$cache/build" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$python" -m pip wheel --quiet --no-deps "$cache/src" -w "$cache/wheel"
  mkdir -p "$cache/bin"
  cp -a "$cache"/build/bin/llama-* "$cache"/build/bin/*.so* "$cache/bin/"  # tools + the libraries they load
  for tool in llama-perplexity llama-quantize llama-imatrix llama-bench llama-completion; do
    test -x "$cache/bin/$tool" || { echo "llamacpp: the build made no $tool" >&2; exit 1; }
  done
  touch "$cache/.built"
fi
rm -rf "$dest" && mkdir -p "$dest"
"$python" -m pip install --quiet --no-deps --target "$dest/lib" "$cache"/wheel/llama_cpp_python-*.whl
cp -a "$cache/bin" "$dest/bin"
ln -s "$cache/src/vendor/llama.cpp" "$dest/llama.cpp"
echo "llamacpp: $(ls "$dest/bin" | grep -c '^llama-') tools in $dest/bin, binding in $dest/lib"
