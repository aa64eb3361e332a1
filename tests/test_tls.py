"""`pdserve serve --tls-cert/--tls-key`: gRPC and HTTP over TLS with a throwaway
self-signed certificate; a plaintext client is refused."""
from __future__ import annotations

import datetime
import os
import signal
import ssl
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from pdserve.v1 import generation_pb2, generation_pb2_grpc

crypto = pytest.importorskip("cryptography")


def _cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    kp, cp = tmp_path / "key.pem", tmp_path / "cert.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(kp), str(cp)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_tls_on_public_ports(tmp_path, default_model_dir):
    key, cert = _cert(tmp_path)
    gp, hp = _port(), _port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--transport", "local",
                             "--model", default_model_dir, "--num-blocks", "128", "--device", "cpu",
                             "--grpc-port", str(gp), "--http-port", str(hp),
                             "--tls-cert", cert, "--tls-key", key],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PDSERVE_NO_PROGRESS="1"))
    try:
        end = time.monotonic() + 180
        while "  HTTP" not in log.read_text() and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.5)
        assert "  HTTP" in log.read_text(), log.read_text()[-2000:]
        r = httpx.get(f"https://localhost:{hp}/health", verify=ssl.create_default_context(cafile=cert),
                      timeout=10)
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{hp}/health", timeout=5)
        creds = grpc.ssl_channel_credentials(open(cert, "rb").read())
        with grpc.secure_channel(f"localhost:{gp}", creds) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            out = "".join(m.text for m in stub.Generate(generation_pb2.GenerateRequest(
                prompt="Hi", sampling=generation_pb2.SamplingParams(max_tokens=3, temperature=0)),
                timeout=60))
            assert isinstance(out, str)
        with grpc.insecure_channel(f"127.0.0.1:{gp}") as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(generation_pb2.GenerateRequest(prompt="Hi"), timeout=5))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
