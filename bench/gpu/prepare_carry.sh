#!/usr/bin/env bash
# Fills .carry/ (git-ignored) with what bench/gpu/check.sh needs on a device machine that has no
# package registry: the doctest header, and Google Benchmark (headers, library, and its CMake
# package, which is relocatable: it finds its files relative to its own location).
#
#   bash bench/gpu/prepare_carry.sh        then run check.sh there with carry [".carry"]
#
# Layout: .carry/include/{doctest,benchmark}/, .carry/lib/x86_64-linux-gnu/{libbenchmark*,cmake/benchmark/}.
# (Debian ships libbenchmark as a shared library only; check.sh puts its folder on LD_LIBRARY_PATH.)
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=.carry
multiarch=x86_64-linux-gnu
rm -rf "$carry"
mkdir -p "$carry/include" "$carry/lib/$multiarch/cmake"
cp -r /usr/include/doctest "$carry/include/"
if [[ -d /usr/include/benchmark && -d /usr/lib/$multiarch/cmake/benchmark ]]; then
  cp -r /usr/include/benchmark "$carry/include/"
  # -L: plain files, not symbolic links (the loader asks for the soname libbenchmark.so.1debian,
  # a link here, and links may not survive the trip to the device machine).
  for f in /usr/lib/$multiarch/libbenchmark.so* /usr/lib/$multiarch/libbenchmark_main.a /usr/lib/$multiarch/libbenchmark.a; do
    if [[ -e $f ]]; then cp -L "$f" "$carry/lib/$multiarch/"; fi
  done
  cp -r /usr/lib/$multiarch/cmake/benchmark "$carry/lib/$multiarch/cmake/"
else
  echo "prepare_carry: no Google Benchmark here (libbenchmark-dev); check.sh will skip the benchmark" >&2
fi
du -sh "$carry"
find "$carry" -maxdepth 3 | sort
