# Shared helpers for the provisioning scripts (sourced, not run).
set -euo pipefail
step() { printf '\n==> [%s] %s\n' "$(hostname)" "$*"; }
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    step "packages already installed: $*"
  fi
}
