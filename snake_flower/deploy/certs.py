"""Certificates and SuperNode keys for a TLS deployment on loopback, made with ``cryptography``.

What Flower 1.41 expects (``flower-superlink --help``, ``flower-supernode --help``):

- the SuperLink serves TLS with ``--ssl-certfile``/``--ssl-keyfile`` (PEM) and names its
  CA with ``--ssl-ca-certfile``; SuperNodes (``--root-certificates``) and the ``flwr`` CLI
  (``root-certificates`` in a connection) verify the server against that CA, so the
  server certificate must name the address they dial (``127.0.0.1``, ``localhost``);
- a SuperNode authenticates with an elliptic-curve key on a NIST curve, the private
  key in OpenSSH format (``--auth-supernode-private-key``, read by
  ``load_ssh_private_key``) and the public key as an OpenSSH line, which
  ``flwr supernode register`` sends to the SuperLink.

These are throwaway credentials for tests and local trials: unencrypted keys, a
CA that lives a day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_FOR = datetime.timedelta(days=1)
CURVE = ec.SECP384R1  # what `ssh-keygen -t ecdsa -b 384` makes, as Flower's examples do


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a CA and of the server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair (OpenSSH formats)."""

    private_key: Path
    public_key: Path


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Write a CA and a server certificate for ``hosts``, signed by it, to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("snake-flower test CA")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), now)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    server_key = ec.generate_private_key(CURVE())
    server_cert = (_builder(_name(hosts[0]), ca_name, server_key.public_key(), now)
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))

    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def make_node_keys(directory: Path, name: str) -> NodeKeys:
    """Write a SuperNode key pair as ``<name>`` (private) and ``<name>.pub`` (public)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE())
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    _write_private(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    keys.public_key.write_bytes(public + f" {name}\n".encode())
    return keys


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
            .not_valid_after(now + VALID_FOR))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)  # ssh tooling, and good manners, refuse group-readable private keys
