#!/usr/bin/env bash
# The GPU run of issue 19, one command (under 8 minutes on one GPU): installs what a bare CUDA image lacks (timed),
# then `python -m benchmarks.gpu.bench`, which writes gpu.json + gpu.md to --out (default benchmarks/results/).
#
#   bash benchmarks/gpu/run.sh [--out DIR] [bench options, e.g. --dry-run, --models unet, --budget-s 300]
#
# The image is expected to have torch, CuPy, timm and accelerate (and their numpy, PyYAML); Hydra, OmegaConf,
# zarr and numcodecs come from benchmarks/gpu/wheelhouse/ (fill it with wheelhouse.sh before carrying it over;
# the device machine reaches no package index), else from the index if one answers. Nothing is upgraded: the
# missing packages go to a separate folder (SEGPLAT_GPU_SITE, default .gpu-site/) put first on PYTHONPATH.
# rasterio, OpenCV, optuna and wandb are not needed: the run's data is generated in memory (BenchClouds).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
wheels="$repo/benchmarks/gpu/wheelhouse"
site="${SEGPLAT_GPU_SITE:-$repo/.gpu-site}"
py="${PYTHON:-$(command -v python || command -v python3)}"
started=$(date +%s.%N)
mkdir -p "$site"
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"

# import name -> distribution; the ones that do not import are installed
needed="hydra:hydra-core omegaconf:omegaconf antlr4:antlr4-python3-runtime zarr:zarr numcodecs:numcodecs
donfig:donfig google_crc32c:google-crc32c tqdm:tqdm typing_extensions:typing-extensions packaging:packaging
yaml:pyyaml numpy:numpy"
missing=()
for pair in $needed; do
    "$py" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
how="nothing to install"
if [ ${#missing[@]} -gt 0 ]; then
    if [ -d "$wheels" ] && "$py" -m pip install --quiet --no-index --find-links "$wheels" --no-deps --target "$site" \
            "${missing[@]}"; then
        how="installed ${missing[*]} from the wheelhouse"
    elif "$py" -m pip install --quiet --no-deps --target "$site" "${missing[@]}"; then
        how="installed ${missing[*]} from the package index"
    else
        echo "error: could not install ${missing[*]}: fill benchmarks/gpu/wheelhouse/ with" \
             "'bash benchmarks/gpu/wheelhouse.sh <python version>' and carry it to this machine." >&2
        exit 2
    fi
fi
seconds=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $started}")
log="$site/install.txt"
echo "$how in $seconds s (python $("$py" -c 'import sys; print(sys.version.split()[0])'))" | tee "$log"
# the bench plans its compiled settings within --budget-s (380 s); this hard limit (SIGTERM: the setting in progress
# is reported as stopped, everything measured is kept) keeps the whole run under 8 minutes
rc=0
timeout --signal=TERM --kill-after=20 "${SEGPLAT_GPU_TIME_LIMIT:-450}" \
    "$py" -m benchmarks.gpu.bench --install-log "$log" "$@" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    # not 124: a caller (the device run tool) would read that as its own time-out
    echo "run.sh: the bench reached its time limit (${SEGPLAT_GPU_TIME_LIMIT:-450} s); what it measured is in gpu.md" >&2
    exit 3
fi
exit "$rc"
