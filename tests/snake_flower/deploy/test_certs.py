"""Certificates and SuperNode keys: a real TLS handshake, and Flower's own key checks."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from snake_flower.deploy.certs import make_node_keys, make_tls


def _handshake(files, server_name: str) -> str:
    """Connect to a TLS server using ``files`` as a client trusting the CA; returns the peer's CN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))  # verifies chain and host name
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
        thread.join(10)
    return subject["commonName"]


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
def test_server_certificate_passes_a_verifying_client(tmp_path, server_name):
    files = make_tls(tmp_path)
    assert _handshake(files, server_name) == "127.0.0.1"


def test_server_certificate_is_refused_for_another_host(tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(make_tls(tmp_path), "example.org")


def test_the_ca_signed_the_server_certificate(tmp_path):
    files = make_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_node_keys_are_what_flower_reads(tmp_path):
    keys = make_node_keys(tmp_path, "node0")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)  # as flower-supernode does
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert try_load_public_key(keys.public_key)  # flwr supernode register's own check (NIST curve)
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_every_node_gets_its_own_key(tmp_path):
    a, b = make_node_keys(tmp_path, "a"), make_node_keys(tmp_path, "b")
    assert a.public_key.read_bytes() != b.public_key.read_bytes()
