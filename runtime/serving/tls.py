"""TLS for the router's public ports and for clients (no torch): a certificate and key read once, checked
up front, and turned into what gRPC and aiohttp each take.

    tls = ServerTls.load("/etc/kubellm/tls/tls.crt", "/etc/kubellm/tls/tls.key")   # a kubernetes.io/tls Secret
    server.add_secure_port(address, tls.grpc_credentials())
    web.TCPSite(runner, host, port, ssl_context=tls.ssl_context())

The files are read at start: a renewed certificate takes effect when the router restarts (a rolling
restart of its Deployment).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, cert_file: str | None, key_file: str | None) -> ServerTls | None:
        """Both files, or neither (None: plaintext). Errors name the flag and say what to give."""
        if not cert_file and not key_file:
            return None
        if not cert_file or not key_file:
            missing = "--tls-cert" if not cert_file else "--tls-key"
            raise ValueError(f"{missing}: give --tls-cert FILE and --tls-key FILE together (a PEM certificate "
                             "chain and its private key, e.g. tls.crt and tls.key of a kubernetes.io/tls Secret)")
        cert, key = _read(cert_file, "--tls-cert"), _read(key_file, "--tls-key")
        tls = cls(str(cert_file), str(key_file), cert, key)
        try:
            tls.ssl_context()   # a key that does not match, or a file that is not PEM, fails here, not at a handshake
        except (ssl.SSLError, ValueError) as err:
            raise ValueError(f"--tls-cert {cert_file} / --tls-key {key_file}: not a PEM certificate chain and its "
                             f"private key ({err})") from None
        return tls

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err.strerror or err})") from None


def channel_credentials(ca_file: str | None = None) -> grpc.ChannelCredentials:
    """A client's TLS: the system's roots, or the CA bundle `ca_file` (a self-signed certificate is its own CA)."""
    roots = None
    if ca_file is not None:
        try:
            with open(ca_file, "rb") as f:
                roots = f.read()
        except OSError as err:
            raise ValueError(f"ca_file {ca_file}: cannot be read ({err.strerror or err})") from None
    return grpc.ssl_channel_credentials(root_certificates=roots)
