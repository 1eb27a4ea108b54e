#!/usr/bin/env bash
# Installs Debian's chromium package, which the browser acceptance test (path_callback_browser_test.go)
# drives headless through chromedp. Does nothing when chromium is already on PATH.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
  echo "Installing chromium from Debian's apt registry..."
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "chromium is missing and installing it needs root (or sudo)" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  ${sudo[@]+"${sudo[@]}"} apt-get update -qq
  ${sudo[@]+"${sudo[@]}"} apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# Debian's launcher script can warn on stderr (e.g. about /dev/shm): show it only if chromium fails.
if ! version=$(chromium --version 2>/dev/null); then
  chromium --version >&2
  exit 1
fi
echo "$version"
