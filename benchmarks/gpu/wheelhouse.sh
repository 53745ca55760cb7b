#!/usr/bin/env bash
# Fill benchmarks/gpu/wheelhouse/ (git-ignored) with the wheels run.sh installs on a bare CUDA image, which has
# torch, CuPy, timm and accelerate but not Hydra or zarr, and may reach no package index.
#
#   bash benchmarks/gpu/wheelhouse.sh [PYTHON_VERSION ...]      # default: 3.11 3.12 3.13 (about 29 MB)
#
# Pure-Python wheels are fetched once; the two compiled ones (numcodecs ~9 MB, google-crc32c) once per Python
# version, so naming only the image's version (e.g. `... 3.12`) cuts the folder to about 11 MB. Then carry it:
#   run(carry=["benchmarks/gpu/wheelhouse"], command="bash benchmarks/gpu/run.sh --out $OUT")
# The versions are those segplat is tested with here; zarr 3 needs Python >= 3.11.
set -euo pipefail
cd "$(dirname "$0")"
dest=wheelhouse
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.11 3.12 3.13)
pure=(hydra-core==1.3.8 omegaconf==2.3.1 zarr==3.1.6 donfig==0.8.1.post1 tqdm==4.70.1 typing-extensions==4.16.0
      packaging==26.4)
compiled=(numcodecs==0.16.6 google-crc32c==1.9.0)
mkdir -p "$dest"
started=$(date +%s)
python -m pip download --quiet --no-deps --only-binary=:all: -d "$dest" "${pure[@]}"
# antlr4-python3-runtime 4.9.3 (pinned by omegaconf/hydra) is published as a source archive only: build its
# (pure-Python) wheel here, so the GPU machine needs no build step
python -m pip wheel --quiet --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
for v in "${versions[@]}"; do
    python -m pip download --quiet --no-deps --only-binary=:all: -d "$dest" --python-version "$v" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        "${compiled[@]}"
done
echo "wheelhouse: $(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $(pwd)/$dest ($(( $(date +%s) - started )) s)"
