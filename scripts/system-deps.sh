#!/usr/bin/env bash
# Debian packages the tests and benchmarks use: espeak-ng (the fallback TTS head), flite, sox, libportaudio2
# (sounddevice, for --mic) and chromium (the browser test). Installed only when missing and
# when we can (root with apt-get); otherwise the tests that need them say why they skip.
set -u
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
ldconfig -p 2>/dev/null | grep -q libportaudio || need+=(libportaudio2)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v flite >/dev/null 2>&1 || need+=(flite)  # test voices of bench/voices.py
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]} (install them with your package manager)" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
  || echo "system-deps: apt-get failed; tests that need ${need[*]} will skip" >&2
exit 0
