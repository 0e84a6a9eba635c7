"""Real TLS peers for tests: a throwaway CA and server certificate (made with the
``openssl`` command, as the venv has no ``cryptography``), and nginx as the TLS origin.

    pki = make_pki(tmp_path, ["api.example.com", "*.svc.example.com"])
    with tls_origin(tmp_path, pki) as origin:      # nginx: TLS 1.2/1.3, ALPN h2 and http/1.1
        ...  # every response says which name and protocol nginx saw:
             # "hello api.example.com HTTP/2.0"
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's certificate, signed by the CA
    key: Path
    names: tuple[str, ...]  # its subjectAltName DNS names


def make_pki(directory: Path, names: Sequence[str]) -> Pki:
    """A CA, and a server certificate for ``names`` signed by it (EC P-256, 2 days)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=l7proxy test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={names[0]}")
    (directory / "server.ext").write_text(
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
        "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    return Pki(
        directory / "ca.pem", directory / "server.pem", directory / "server.key", tuple(names)
    )


@dataclass(frozen=True)
class Origin:
    host: str
    port: int
    root: Path

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextmanager
def tls_origin(
    workdir: Path,
    pki: Pki,
    *,
    host: str = LOOPBACK,
    port: int | None = None,
    prefix: Sequence[str] = (),
    ecdh_curve: str | None = None,
    client_ca: Path | None = None,
) -> Iterator[Origin]:
    """nginx serving TLS 1.2 and 1.3 with ``pki``'s certificate, HTTP/2 and HTTP/1.1 by ALPN,
    on ``host:port`` (``prefix``: run it through e.g. ``ip netns exec NS``). Every response
    body is ``hello <the SNI nginx saw> <HTTP version>`` (and ``client_ca``: the client
    certificate's subject, which nginx then requires). ``ecdh_curve="prime256v1"``: a
    client that offers an X25519 key share (OpenSSL's default) gets a HelloRetryRequest."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    port = port or free_port()
    # With client_ca: clients must present a certificate it signed, and the body ends
    # with the subject nginx verified.
    client_dn = " $ssl_client_s_dn" if client_ca else ""
    root = workdir / "nginx"
    root.mkdir(parents=True, exist_ok=True)
    # nginx drops privileges to nobody when root; the files are ours, so stay ourselves.
    user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {host}:{port} ssl http2;
        ssl_certificate {pki.cert};
        ssl_certificate_key {pki.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {f"ssl_ecdh_curve {ecdh_curve};" if ecdh_curve else ""}
        {f"ssl_client_certificate {client_ca}; ssl_verify_client on;" if client_ca else ""}
        location / {{ return 200 "hello $ssl_server_name $server_protocol{client_dn}\\n"; }}
    }}
}}
""")
    argv = [
        *prefix,
        exe,
        "-p",
        str(root),
        "-e",
        str(root / "error.log"),
        "-c",
        str(root / "nginx.conf"),
    ]
    log = open(root / "stderr.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(root / 'error.log').read_text()[-2000:]}")
            try:
                socket.create_connection((host, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not listen in time") from None
                time.sleep(0.05)
        yield Origin(host, port, root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def make_leaf(
    pki: Pki,
    stem: str,
    *,
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    ips: Sequence[str] = (),
    subject: str | None = None,
    client: bool = False,
) -> tuple[Path, Path]:
    """Another certificate signed by ``pki``'s CA, beside it: ``stem.pem`` and
    ``stem.key``. ``client=True`` makes a client certificate (clientAuth); ``uris``
    become URI subjectAltNames (a SPIFFE ID: ``spiffe://example.org/ns/a/sa/b``), ``ips``
    IP ones (for clients that check the address they dialled, as Kafka's do)."""
    directory = pki.ca.parent

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    cn = subject or f"/CN={(dns or [stem])[0]}"
    openssl("req", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", cn)
    sans = [f"DNS:{n}" for n in dns] + [f"URI:{u}" for u in uris] + [f"IP:{i}" for i in ips]
    (directory / f"{stem}.ext").write_text(
        (f"subjectAltName={','.join(sans)}\n" if sans else "")
        + f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}\n"
        "basicConstraints=CA:FALSE\n"
    )
    openssl(
        "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{stem}.pem", "-days", "2", "-extfile", f"{stem}.ext",
    )  # fmt: skip
    return directory / f"{stem}.pem", directory / f"{stem}.key"
