"""TLS terminated by l7proxy's API firewall, against haproxy terminating with the same
certificate, in the same run.

    python -m bench tls [--duration 8] [--rounds 3] [--connections 32]

One run makes an EC P-256 certificate with ``openssl``, starts nginx (the cleartext
upstream), l7proxy in firewall mode with ``--tls-cert`` and an L7 rule in force (GET /.*
allowed), the same l7proxy without TLS, and haproxy (one thread) with ``ssl crt`` and the
equivalent ACL. Then, interleaved ``--rounds`` times:

- handshakes: wrk over HTTPS with ``Connection: close``, so every request is a new TCP
  connection and a full TLS 1.3 handshake (wrk resumes no session): handshakes/s and proxy
  CPU per handshake;
- keep-alive: wrk over HTTPS on kept connections: proxy CPU per request, and the same for
  l7proxy in cleartext, so that what TLS adds per request is measured too.

Checked first, in the same run: both proxies serve the certificate, answer GET with 200
and POST with 403 over TLS, and l7proxy says it runs on uvloop (whose TLS transport does the
records). Results go to ``bench/results/tls.json``; tables are printed.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    REPO,
    CpuMeter,
    Service,
    markdown_table,
    median,
    ratio,
    run_wrk,
    start_firewall,
    start_haproxy,
    start_nginx,
    tool_version,
    us_per_request,
    write_results,
)

NAME = "bench.example.com"
HAPROXY_RULES = "http-request deny unless { method GET } { path_reg ^/.* }"
# wrk's request: a new connection and handshake for every one.
CLOSE_LUA = 'wrk.headers["Connection"] = "close"\n'
NO_REUSE = "haproxy-no-reuse"


def policy_yaml(upstream_port: int) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-get-only
spec:
  endpointSelector:
    matchLabels: {{app: bench}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{{port: "{upstream_port}", protocol: TCP}}]
      rules:
        http:
        - method: GET
          path: "/.*"
"""


def firewall_tls_args(cert: Path, key: Path) -> list[str]:
    """l7proxy's flags to terminate TLS with ``cert``, HTTP/1.1 by ALPN (every TLS bench)."""
    return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-alpn", "http/1.1"]


def haproxy_tls_bind(combined: Path) -> str:
    """haproxy's bind options for the same certificate, ALPN and lowest version."""
    return f"ssl crt {combined} alpn http/1.1 ssl-min-ver TLSv1.2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n\n")[0])
    argv = [] if argv is None else argv
    p.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs (medians reported)")
    p.add_argument("--connections", type=int, default=32)
    return p.parse_args(argv)


def make_certificate(workdir: Path) -> tuple[Path, Path, Path, Path]:
    """A CA and an EC P-256 server certificate for NAME: (ca, cert, key, cert+key PEM)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={NAME}")
    (workdir / "server.ext").write_text(f"subjectAltName=DNS:{NAME}\nbasicConstraints=CA:FALSE\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    combined = workdir / "haproxy.pem"  # haproxy reads the certificate and key from one file
    combined.write_text((workdir / "server.pem").read_text() + (workdir / "server.key").read_text())
    return workdir / "ca.pem", workdir / "server.pem", workdir / "server.key", combined


def check(service: Service, ca: Path) -> list[str]:
    """GET 200 and POST 403 over TLS, verified against our CA: problems found, if any."""
    context = ssl.create_default_context(cafile=str(ca))
    problems = []
    for method, want in (("GET", 200), ("POST", 403)):
        try:
            with socket.create_connection((service.host, service.port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=NAME) as tls:
                    tls.sendall(
                        f"{method} /x HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 0\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    head = tls.recv(65536).split(b"\r\n", 1)[0]
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{service.name} {method}: {exc}")
            continue
        if head.split()[1:2] != [str(want).encode()]:
            problems.append(f"{service.name} {method}: {head!r}, expected {want}")
    return problems


def load(service: Service, url: str, args: argparse.Namespace, workdir: Path, lua: str = ""):
    cpu = CpuMeter(service.pid)
    result = run_wrk(url, connections=args.connections, duration=args.duration, workdir=workdir,
                     extra_lua=lua)  # fmt: skip
    cpu_s = cpu.stop()
    if result.socket_errors or result.status_errors:
        raise RuntimeError(f"{service.name}: wrk saw errors: {result.as_dict()}")
    return {
        "rps": round(result.rps, 1),
        "requests": result.requests,
        "proxy_cpu_s": round(cpu_s, 3),
        "proxy_us_per_req": round(us_per_request(cpu_s, result.requests), 2),
        "p50_ms": round(result.p50_us / 1000, 3),
        "p99_ms": round(result.p99_us / 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        ca, cert, key, combined = make_certificate(workdir)
        nginx = stack.enter_context(start_nginx(workdir))
        upstream = (LOOPBACK, nginx.port)
        tls_args = firewall_tls_args(cert, key)
        l7 = stack.enter_context(
            start_firewall(
                policy_yaml(nginx.port), upstream, {"app": "bench"}, workdir, extra_args=tls_args
            )  # fmt: skip
        )
        l7_clear = stack.enter_context(
            start_firewall(
                policy_yaml(nginx.port),
                upstream,
                {"app": "bench"},
                workdir,
                name="l7proxy-cleartext",
            )  # fmt: skip
        )
        haproxy_bind = haproxy_tls_bind(combined)
        haproxy = stack.enter_context(
            start_haproxy(
                workdir, upstream, frontend_rules=HAPROXY_RULES, bind_options=haproxy_bind
            )
        )
        # haproxy hands a server connection on from one client to the next (http-reuse safe);
        # l7proxy opens one per client connection. This one does as l7proxy does.
        haproxy_no_reuse = stack.enter_context(
            start_haproxy(
                workdir,
                upstream,
                frontend_rules=HAPROXY_RULES,
                bind_options=haproxy_bind,
                backend_lines="http-reuse never",
                name=NO_REUSE,
            )
        )
        loop_line = next(
            (
                ln
                for ln in (l7.workdir / "stderr.log").read_text().splitlines()
                if "event loop" in ln
            ),
            "",
        )
        problems = check(l7, ca) + check(haproxy, ca) + check(haproxy_no_reuse, ca)
        if "uvloop" not in loop_line:
            problems.append(f"l7proxy is not on uvloop: {loop_line!r}")
        if problems:
            for p in problems:
                print(f"PROBLEM: {p}", file=sys.stderr)
            return 1

        https = {s.name: f"https://{LOOPBACK}:{s.port}/x" for s in (l7, haproxy, haproxy_no_reuse)}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            "handshakes": {"l7proxy": [], "haproxy": [], NO_REUSE: [], "l7proxy-cleartext": []},
            "keepalive": {"l7proxy": [], "haproxy": [], "l7proxy-cleartext": []},
        }
        for _ in range(args.rounds):
            for service in (l7, haproxy, haproxy_no_reuse):
                runs["handshakes"][service.name].append(
                    load(service, https[service.name], args, workdir, CLOSE_LUA)
                )
            runs["handshakes"]["l7proxy-cleartext"].append(
                load(l7_clear, f"http://{LOOPBACK}:{l7_clear.port}/x", args, workdir, CLOSE_LUA)
            )
            for service in (l7, haproxy):
                runs["keepalive"][service.name].append(
                    load(service, https[service.name], args, workdir)
                )
            runs["keepalive"]["l7proxy-cleartext"].append(
                load(l7_clear, f"http://{LOOPBACK}:{l7_clear.port}/x", args, workdir)
            )

    def med(kind: str, name: str, key: str) -> float:
        return median([r[key] for r in runs[kind][name]])

    summary = {
        kind: {
            name: {key: med(kind, name, key) for key in ("rps", "proxy_us_per_req", "p99_ms")}
            for name in runs[kind]
        }
        for kind in runs
    }
    headline = {
        "handshake_cpu_l7proxy_over_haproxy": ratio(
            summary["handshakes"]["l7proxy"]["proxy_us_per_req"],
            summary["handshakes"]["haproxy"]["proxy_us_per_req"],
        ),
        "handshake_cpu_l7proxy_over_haproxy_no_reuse": ratio(
            summary["handshakes"]["l7proxy"]["proxy_us_per_req"],
            summary["handshakes"][NO_REUSE]["proxy_us_per_req"],
        ),
        "handshakes_per_s_l7proxy_over_haproxy": ratio(
            summary["handshakes"]["l7proxy"]["rps"], summary["handshakes"]["haproxy"]["rps"]
        ),
        "keepalive_cpu_l7proxy_over_haproxy": ratio(
            summary["keepalive"]["l7proxy"]["proxy_us_per_req"],
            summary["keepalive"]["haproxy"]["proxy_us_per_req"],
        ),
        # Each pair measured a minute apart (the medians above may pair rounds the
        # machine's load moved apart).
        **{
            f"{kind}_cpu_l7proxy_over_haproxy_by_round": [
                ratio(a["proxy_us_per_req"], b["proxy_us_per_req"])
                for a, b in zip(runs[kind]["l7proxy"], runs[kind]["haproxy"], strict=True)
            ]
            for kind in ("handshakes", "keepalive")
        },
        "tls_us_per_handshake_l7proxy": round(
            summary["handshakes"]["l7proxy"]["proxy_us_per_req"]
            - summary["handshakes"]["l7proxy-cleartext"]["proxy_us_per_req"],
            2,
        ),
        "tls_us_per_keepalive_request_l7proxy": round(
            summary["keepalive"]["l7proxy"]["proxy_us_per_req"]
            - summary["keepalive"]["l7proxy-cleartext"]["proxy_us_per_req"],
            2,
        ),
    }
    doc = {
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "certificate": "EC P-256, TLS 1.3 (TLS_AES_256_GCM_SHA384), full handshakes",
            "haproxy": f"nbthread 1, ssl crt (same certificate), {HAPROXY_RULES}",
            NO_REUSE: "the same with http-reuse never (a server connection per client "
            "connection, as l7proxy), handshakes only",
            "l7proxy": "firewall --tls-cert --tls-alpn http/1.1, " + loop_line.split("INFO ")[-1],
            "openssl": tool_version(["openssl", "version"]),
            "haproxy_version": tool_version(["haproxy", "-v"]),
        },
        "headline": headline,
        "summary": summary,
        "runs": runs,
    }
    path = write_results("tls", doc)
    print(report(doc))
    print(f"\nwritten: {path.relative_to(REPO)}")
    return 0


def report(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    rows = [
        [kind, name, v["rps"], v["proxy_us_per_req"], v["p99_ms"]]
        for kind in s
        for name, v in s[kind].items()
    ]
    table = markdown_table(["load", "proxy", "req/s", "proxy CPU µs/req", "p99 ms"], rows)
    h = doc["headline"]

    def rounds(kind: str) -> str:
        by_round = h.get(f"{kind}_cpu_l7proxy_over_haproxy_by_round", [])
        return ", ".join(f"{r:.2f}" for r in by_round)

    return (
        f"{table}\n\nCPU per handshake, l7proxy / haproxy: "
        f"{h['handshake_cpu_l7proxy_over_haproxy']:.2f}x (rounds: {rounds('handshakes')}; "
        f"against haproxy with a server connection per client, as l7proxy: "
        f"{h['handshake_cpu_l7proxy_over_haproxy_no_reuse']:.2f}x)\n"
        f"CPU per keep-alive HTTPS request, l7proxy / haproxy: "
        f"{h['keepalive_cpu_l7proxy_over_haproxy']:.2f}x (rounds: {rounds('keepalive')})\n"
        f"TLS's share of l7proxy's connection (handshake and close): "
        f"{h['tls_us_per_handshake_l7proxy']:.0f} µs\n"
        f"TLS's share of l7proxy's keep-alive request: "
        f"{h['tls_us_per_keepalive_request_l7proxy']:.1f} µs"
    )


if __name__ == "__main__":
    sys.exit(main())
