"""The README's serve command, as a user runs it: a real process with its own Ray, TLS and API keys on,
listening on every interface (as in a pod) so that what is reachable from elsewhere can be checked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc
from gemma4_platform.graph import DRAIN_S
from platform_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve")
    cert, key = self_signed(tmp)
    keys = tmp / "api-keys"
    keys.write_text(KEY + "\n")
    ports = {"http": free_port(), "grpc": free_port(), "tls": free_port()}
    cmd = [
        sys.executable, "-m", "gemma4_platform.cli", "serve", "--set", "server.host=0.0.0.0",
        "--set", f"server.http_port={ports['http']}", "--set", f"server.grpc_port={ports['grpc']}",
        "--set", f"server.grpc_tls_port={ports['tls']}",
        "--set", f"server.tls_cert_file={cert}", "--set", f"server.tls_key_file={key}",
        "--set", f"gateway.api_keys_file={keys}", "--set", "replica.num_cpus=0",
        "--set", "engine.num_kv_blocks=256", "--set", "engine.max_num_batched_tokens=256",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}"}
    env.pop("RAY_ADDRESS", None)
    # Its own session, so the test can signal its whole process group (Ray's processes included).
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "gemma4-platform is ready" in line:
            break
    else:
        proc.kill()
    if proc.poll() is not None or not any("is ready" in line for line in lines):
        proc.kill()
        pytest.fail("serve did not start:\n" + "".join(lines[-40:]))
    yield {"ports": ports, "cert": cert, "proc": proc}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # graceful: drain and stop Ray
    try:
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_command_answers_grpc_over_tls_and_plaintext(served) -> None:
    ports = served["ports"]
    credentials = grpc.ssl_channel_credentials(root_certificates=served["cert"].read_bytes())
    metadata = (("authorization", f"Bearer {KEY}"),)
    with grpc.secure_channel(f"localhost:{ports['tls']}", credentials) as channel:
        stub = pb_grpc.Gemma4ServingStub(channel)
        reply = stub.Generate(pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=4)), metadata=metadata, timeout=60)
        assert reply.usage.completion_tokens >= 1
        streamed = list(stub.GenerateStream(pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=4)), metadata=metadata, timeout=60))
        assert streamed[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = pb_grpc.Gemma4ServingStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(text="Hello"), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Health(pb.HealthRequest(), metadata=(("x-api-key", KEY),), timeout=30).ready


def external_address() -> str:
    """This machine's address on its first non-loopback interface (what other hosts would connect to)."""
    for line in subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                               text=True, check=True, timeout=10).stdout.splitlines():
        return line.split()[3].split("/")[0]
    pytest.fail("this machine has no non-loopback IPv4 address to test reachability from elsewhere")


def test_with_tls_the_plaintext_grpc_port_is_loopback_only(served) -> None:
    ports, address = served["ports"], external_address()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, ports["grpc"]), timeout=10).close()
    socket.create_connection((address, ports["tls"]), timeout=10).close()  # the TLS port is the public one
    socket.create_connection((address, ports["http"]), timeout=10).close()


def test_serve_command_answers_openai_over_https(served) -> None:
    http = httpx.Client(verify=str(served["cert"]), timeout=60)
    base = f"https://localhost:{served['ports']['http']}/v1"
    client = openai.OpenAI(base_url=base, api_key=KEY, http_client=http)
    chunks = list(client.chat.completions.create(
        model="gemma-4", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
    ))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert http.get(base + "/models").status_code == 401  # no key


def test_example_grpc_client_runs_against_the_server(served) -> None:
    out = subprocess.run(
        [sys.executable, "examples/grpc_client.py", "--target", f"localhost:{served['ports']['tls']}",
         "--tls-ca", str(served["cert"]), "--api-key", KEY, "--max-tokens", "4", "Hello"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'platform'}:{REPO / 'model'}"},
    )
    assert out.returncode == 0, out.stderr
    assert "-- FINISH_REASON_" in out.stdout and "completion:" in out.stdout


def test_sigterm_to_the_whole_process_group_stops_within_the_drain_time(served) -> None:
    """SIGTERM reaches Ray's own processes too (the GCS dies with it): the command still exits cleanly,
    within the drain time and a few seconds, instead of waiting out Serve's shutdown timeouts."""
    proc = served["proc"]
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=DRAIN_S + 15)
    assert code == 0, "serve's last output:\n" + proc.stdout.read()[-4000:]
