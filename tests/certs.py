"""Throwaway TLS material for tests: a CA and a server certificate it signs; for mutual TLS, a
client CA and client certificates it signs.

    certs = make_certs(tmp_path)            # files ca.pem, server.pem, server.key in tmp_path
    server: (certs.server_chain, certs.server_key)    client: certs.ca_cert
    clients = make_client_certs(tmp_path, ["c0"])     # client-ca.pem, c0.pem, c0.key
    service: clients.ca_cert    client c0: clients.chains["c0"] (chain, key)

ECDSA P-256 keys, so that generating them takes milliseconds. The server certificate is valid for
127.0.0.1, ::1 and localhost unless other ``hosts`` are given (IP addresses or DNS names).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertBundle:
    """PEM bytes; ``server_chain`` is the server certificate followed by the CA's."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes

    @property
    def server_chain(self) -> bytes:
        return self.server_cert + self.ca_cert


def make_certs(
    directory: Path | None = None,
    hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
    days: int = 1,
) -> CertBundle:
    """A fresh CA and server certificate; also written to ``directory`` when given."""
    validity = _validity(days)
    ca_key, ca_name, ca_cert = _ca("fedtan test CA", validity)

    key = ec.generate_private_key(ec.SECP256R1())
    names = [_general_name(h) for h in hosts]
    cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
            ca_name,
            key.public_key(),
            validity,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    bundle = CertBundle(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert=cert.public_bytes(serialization.Encoding.PEM),
        server_key=_private_pem(key),
    )
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.pem").write_bytes(bundle.ca_cert)
        (directory / "server.pem").write_bytes(bundle.server_chain)
        (directory / "server.key").write_bytes(bundle.server_key)
        (directory / "server.key").chmod(0o600)
    return bundle


@dataclass(frozen=True)
class ClientCerts:
    """PEM bytes: the client CA, and per client name its (certificate chain, private key)."""

    ca_cert: bytes
    chains: dict[str, tuple[bytes, bytes]]


def make_client_certs(
    directory: Path | None = None, names: tuple[str, ...] | list[str] = ("client",), days: int = 1
) -> ClientCerts:
    """A fresh client CA and a client certificate (client-auth usage) per name; also written to
    ``directory`` when given: ``client-ca.pem``, ``<name>.pem`` (chain), ``<name>.key``."""
    validity = _validity(days)
    ca_key, ca_name, ca_cert = _ca("fedtan test client CA", validity)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    chains = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                ca_name,
                key.public_key(),
                validity,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        chains[name] = (cert.public_bytes(serialization.Encoding.PEM) + ca_pem, _private_pem(key))
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "client-ca.pem").write_bytes(ca_pem)
        for name, (chain, key_pem) in chains.items():
            (directory / f"{name}.pem").write_bytes(chain)
            (directory / f"{name}.key").write_bytes(key_pem)
            (directory / f"{name}.key").chmod(0o600)
    return ClientCerts(ca_cert=ca_pem, chains=chains)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _ca(
    common_name: str, validity: tuple[dt.datetime, dt.datetime]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Name, x509.Certificate]:
    """A self-signed CA: its key, name and certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_name, ca_cert


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    validity: tuple[dt.datetime, dt.datetime],
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
