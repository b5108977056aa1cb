"""HTTPS for the local MLflow server (``up --tls``): a certificate authority made for this cluster and a
server certificate it signs for the tracking host's address, both kept in the state folder (``tls/``) so a
restarted server keeps them. Clients verify the server with the CA (``MLFLOW_TRACKING_SERVER_CERT_PATH``,
which MLflow's client reads); the private keys are written 0600. Made with ``cryptography`` (already
installed with MLflow) rather than by calling ``openssl``: no subprocess, no config file.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from infra.cluster.credentials import write_private

CA_FILE = "ca.pem"
CERT_FILE = "mlflow.pem"
KEY_FILE = "mlflow-key.pem"
VALID_DAYS = 365


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def server_certificate(folder: Path, addresses: list[str], cluster_id: str) -> tuple[Path, Path, Path]:
    """``(ca.pem, mlflow.pem, mlflow-key.pem)`` in ``folder``: made once (a CA named after the cluster and a
    server certificate for ``addresses``, IP SANs), then reused while they cover ``addresses``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_path, cert_path, key_path = folder / CA_FILE, folder / CERT_FILE, folder / KEY_FILE
    wanted = {ipaddress.ip_address(a) for a in addresses}
    if ca_path.is_file() and cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = set(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.IPAddress
            )
        )
        if wanted <= sans:
            return ca_path, cert_path, key_path
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = _key(), _key()
    ca_name = _name(f"vae local cluster {cluster_id} CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("mlflow"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(a) for a in sorted(wanted, key=str)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_private(key_path, _pem_key(server_key))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))  # the CA's key is not kept
    return ca_path, cert_path, key_path


def client_context(ca_path: Path | None):
    """An ``ssl`` context that trusts ``ca_path`` (None: the default context) for urllib."""
    import ssl

    return ssl.create_default_context(cafile=str(ca_path)) if ca_path else None
