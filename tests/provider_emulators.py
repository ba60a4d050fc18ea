"""The cloud provider emulators (Bedrock, Vertex, OpenAI-compatible) on a background event loop,
with their test credentials, for end-to-end tests and the TTFB bench."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators import bedrock, openai_compat, vertex

AWS_KEY_ID = "AKIDEXAMPLETESTKEY01"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
OPENAI_KEY = "sk-oss-test-key"
PROJECT, REGION = "ccr-test-project", "us-east5"
ENV = {"CCR_T_AWS_KEY_ID": AWS_KEY_ID, "CCR_T_AWS_SECRET": AWS_SECRET, "CCR_T_OSS_KEY": OPENAI_KEY}


@dataclass
class Emulators:
    bedrock_url: str
    vertex_url: str
    openai_url: str
    bedrock: bedrock.BedrockEmulator
    vertex: vertex.VertexEmulator
    openai: openai_compat.OpenAICompatEmulator
    service_account_file: Path
    loop: asyncio.AbstractEventLoop

    def env(self) -> dict[str, str]:
        return {**ENV, "CCR_T_GCP_SA": str(self.service_account_file)}

    def providers(self) -> list[dict[str, Any]]:
        return [
            {"name": "bedrock", "kind": "bedrock", "endpoint": self.bedrock_url, "region": "us-east-1",
             "aws_access_key_id_env": "CCR_T_AWS_KEY_ID", "aws_secret_access_key_env": "CCR_T_AWS_SECRET"},
            {"name": "vertex", "kind": "vertex", "endpoint": self.vertex_url, "region": REGION, "project": PROJECT,
             "service_account_file_env": "CCR_T_GCP_SA"},
            {"name": "oss", "kind": "openai", "endpoint": self.openai_url, "api_key_env": "CCR_T_OSS_KEY",
             "model_ids": {"claude-oss-1": "qwen/Qwen3-8B"}},
            # The same server with a short keep-alive interval, for the ping tests.
            {"name": "ossping", "kind": "openai", "endpoint": self.openai_url, "api_key_env": "CCR_T_OSS_KEY",
             "ping_interval_s": 0.05},
        ]

    def models(self) -> list[dict[str, Any]]:
        return [{"match": "claude-bedrock-*", "provider": "bedrock"},
                {"match": "claude-vertex-*", "provider": "vertex"},
                {"match": "claude-oss-*", "provider": "oss"},
                {"match": "claude-ping-*", "provider": "ossping"}]


def service_account(path: Path, token_uri: str) -> bytes:
    """A service-account key file (a fresh test RSA key) whose token_uri is the emulator's; returns the public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": PROJECT, "private_key_id": "test-key-1", "private_key": pem,
        "client_email": f"ccr-gateway@{PROJECT}.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": token_uri}))
    path.chmod(0o600)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@contextmanager
def running_emulators(tmp: Path, tokens_per_second: float = 0.0) -> Iterator[Emulators]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    sa_file = tmp / "service-account.json"
    # The key file needs the token URI, which needs the port: bind first with a placeholder key.
    placeholder = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    b_runner, b_port, b_emu = run(bedrock.start(access_key_id=AWS_KEY_ID, secret_access_key=AWS_SECRET,
                                                region="us-east-1", tokens_per_second=tokens_per_second))
    v_runner, v_port, v_emu = run(vertex.start(project=PROJECT, region=REGION, public_key_pem=placeholder))
    o_runner, o_port, o_emu = run(openai_compat.start(api_key=OPENAI_KEY, tokens_per_second=tokens_per_second))
    from joserfc.jwk import RSAKey

    v_emu.key = RSAKey.import_key(service_account(sa_file, f"{v_emu.base_url}/token"))
    try:
        yield Emulators(f"http://127.0.0.1:{b_port}", v_emu.base_url, f"http://127.0.0.1:{o_port}",
                        b_emu, v_emu, o_emu, sa_file, loop)
    finally:
        for r in (b_runner, v_runner, o_runner):
            run(r.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main() -> None:
    """`python -m tests.provider_emulators DIR`: serve the three emulators until SIGTERM; prints one
    JSON line (urls, service-account file) once serving. For benchmarks, which must not share a GIL
    with the emulators they measure."""
    import signal
    import sys

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running_emulators(Path(sys.argv[1])) as e:
        print(json.dumps({"bedrock_url": e.bedrock_url, "vertex_url": e.vertex_url, "openai_url": e.openai_url,
                          "service_account_file": str(e.service_account_file)}), flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
