# One image for every part of ccr; the command picks the part (`ccr serve NAME`, see
# docker-compose.yml). Envoy, the opa CLI and ccr come from the same pinned install as a checkout.
FROM golang:1.26 AS opa
ARG OPA_VERSION=v1.22.3
RUN GOBIN=/out go install "github.com/open-policy-agent/opa@${OPA_VERSION}"

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends util-linux ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/ccr --create-home ccr
COPY --from=opa /out/opa /usr/local/bin/opa
WORKDIR /opt/ccr
COPY pyproject.toml README.md ./
COPY ccr ccr
COPY extauth extauth
COPY ratelimit ratelimit
COPY router router
COPY audit audit
COPY signin signin
COPY emulators emulators
COPY envoy envoy
COPY policies policies
# Editable: ccr finds envoy/bootstrap.yaml and policies/ beside its code.
RUN pip install --no-cache-dir -e . \
    && mkdir -p /var/lib/ccr/pki && chown -R ccr /var/lib/ccr
USER ccr
ENTRYPOINT []
CMD ["ccr", "--help"]
