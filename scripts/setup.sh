#!/usr/bin/env bash
# Installs what impasto needs to build and run, idempotently:
#   - Debian's FFmpeg 5.1 development packages, the ffmpeg/ffprobe CLI, clang/libclang, pkg-config;
#   - libtorch from PyPI (torch==2.11.0) into the project-local virtualenv .venv:
#     the minimal CPU install, or the full CUDA install where `nvidia-smi` works or IMPASTO_TORCH=full.
# Re-running it when everything is present does nothing but check.
# Prints the environment to use as shell assignments on the last lines (see scripts/env.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IMPASTO_VENV:-$here/.venv}"
torch_version="2.11.0"

log() { printf 'setup: %s\n' "$*" >&2; }

apt_packages=(
  pkg-config clang libclang-dev ffmpeg
  libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
  libswscale-dev libswresample-dev
  # the daemon's tests: unit checks (systemd-analyze, systemd-sysusers) and the dashboard in a browser
  systemd chromium
)

install_apt() {
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "Debian packages present"; return; fi
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

want_full_torch() {
  [ "${IMPASTO_TORCH:-}" = "full" ] && return 0
  [ "${IMPASTO_TORCH:-}" = "minimal" ] && return 1
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

install_torch() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    python3 -m venv "$venv"
  fi
  local have
  have="$("$venv/bin/python" -m pip show torch 2>/dev/null | awk '/^Version:/{print $2}' || true)"
  local want_full=0; want_full_torch && want_full=1
  local have_cuda=0
  "$venv/bin/python" -m pip show nvidia-cudnn-cu13 >/dev/null 2>&1 && have_cuda=1
  if [ "${have%%+*}" = "$torch_version" ] && { [ $want_full -eq 0 ] || [ $have_cuda -eq 1 ]; }; then
    log "torch $have present in $venv"; return
  fi
  if [ $want_full -eq 1 ]; then
    log "installing torch==$torch_version (full, with CUDA libraries)"
    "$venv/bin/python" -m pip install -q "torch==$torch_version"
  else
    log "installing torch==$torch_version (minimal, CPU use; ~540 MB)"
    "$venv/bin/python" -m pip install -q --no-deps "torch==$torch_version" \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  fi
}


install_apt
install_torch
libtorch="$(ls -d "$venv"/lib/python3.*/site-packages/torch | head -n1)"
log "LIBTORCH=$libtorch"
echo "export LIBTORCH='$libtorch'"
echo "export LIBTORCH_BYPASS_VERSION_CHECK=0"
