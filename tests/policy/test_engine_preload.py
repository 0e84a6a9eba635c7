"""A policy's parser engines are imported when the policy is loaded, not by the first
connection that needs one (an import holds the event loop for everyone)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support import REPO

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    from l7proxy.observe.flowlog import FlowLog
    from l7proxy.proxy.firewall import Firewall

    POLICY = '''
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
        - toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET}]
    '''
    engines = ("parsers.http", "parsers.http2.engine", "parsers.cql.engine")
    print(*[name in sys.modules for name in engines])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as policy:
        policy.write(POLICY)
        policy.flush()
        Firewall(
            listen=("127.0.0.1", 0),
            upstream=("127.0.0.1", 80),
            labels={"app": "web"},
            policy_paths=[policy.name],
            flowlog=FlowLog(),
        )
    print(*[name in sys.modules for name in engines])
    """
)


def test_a_firewall_loading_an_http_policy_imports_the_http_engines_and_no_other():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.splitlines()
    assert before.split() == ["False", "False", "False"]
    assert after.split() == ["True", "True", "False"]
