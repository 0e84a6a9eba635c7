"""A bad policy is rejected with the file, the YAML path and the reason; the last good one stays."""

from __future__ import annotations

import subprocess
import sys

import pytest

from l7proxy.policy.errors import PolicyError
from l7proxy.policy.load import load_paths, load_text
from l7proxy.policy.source import PolicySnapshot, PolicySource
from tests.support import REPO

HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"


@pytest.mark.parametrize(
    "body, path, reason",
    [
        ("spec:\n  ingress: []\n", "spec", "endpointSelector is required"),
        ("spec:\n  endpointSelector: {}\n  ingres: []\n", "spec.ingres", "unknown field"),
        (
            "spec:\n  endpointSelector: {matchLabels: []}\n",
            "spec.endpointSelector.matchLabels",
            "expected a mapping",
        ),
        (
            "spec:\n  endpointSelector: {matchExpressions: [{key: a, operator: Maybe}]}\n",
            "spec.endpointSelector.matchExpressions[0].operator",
            "expected In, NotIn, Exists or DoesNotExist",
        ),
        (
            "spec:\n  endpointSelector: {matchExpressions: [{key: a, operator: In}]}\n",
            "spec.endpointSelector.matchExpressions[0].values",
            "In needs at least one value",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{fromCIDR: [10.0.0.300/8]}]\n",
            "spec.ingress[0].fromCIDR[0]",
            "invalid CIDR",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{fromCIDRSet: [{cidr: 10.0.0.0/8, except: "
            "[11.0.0.0/8]}]}]\n",
            "spec.ingress[0].fromCIDRSet[0].except[0]",
            "is not inside",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{fromEntities: [moon]}]\n",
            "spec.ingress[0].fromEntities[0]",
            "unsupported entity",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 70000}]}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].port",
            "out of range",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: http}]}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].port",
            "named ports",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 90, endPort: "
            "80}]}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].endPort",
            "between port",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80, protocol: "
            "SCTP}]}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].protocol",
            "expected TCP, UDP or ANY",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: "
            "{http: [{path: '(unclosed'}]}}]}]\n",
            "spec.ingress[0].toPorts[0].rules.http[0].path",
            "invalid regex",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: "
            "{smtp: []}}]}]\n",
            "spec.ingress[0].toPorts[0].rules.smtp",
            "unknown field",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: "
            "{l7proto: gopher, l7: []}}]}]\n",
            "spec.ingress[0].toPorts[0].rules.l7proto",
            "unknown L7 protocol",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{rules: {http: [{method: "
            "GET}]}}]}]\n",
            "spec.ingress[0].toPorts[0].rules",
            "L7 rules need toPorts[].ports",
        ),
        (
            "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: "
            "{http: [{headerMatches: [{name: X, mismatch: ADD}]}]}}]}]\n",
            "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].value",
            "needs a value",
        ),
        (
            "spec:\n  endpointSelector: {}\n  egress: [{fromEndpoints: [{}]}]\n",
            "spec.egress[0].fromEndpoints",
            "unknown field",
        ),
    ],
)
def test_rejections_name_the_yaml_path_and_reason(body, path, reason):
    with pytest.raises(PolicyError) as info:
        load_text(HEAD + body, source="bad.yaml")
    err = info.value
    assert (err.file, err.path) == ("bad.yaml", path)
    assert reason in err.reason
    assert str(err).startswith(f"bad.yaml: {path}: ")


def test_wrong_api_version_and_invalid_yaml():
    with pytest.raises(PolicyError, match="apiVersion: expected cilium.io/v2"):
        load_text(
            "apiVersion: v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: "
            "{endpointSelector: {}}\n"
        )
    with pytest.raises(PolicyError, match=r"line 2, column \d+: invalid YAML"):
        load_text("a: [\nb: }\n")


def test_multi_document_files_name_the_document():
    text = (
        HEAD
        + "spec: {endpointSelector: {}}\n---\n"
        + HEAD.replace("name: p", "name: q")
        + "spec: {endpointSelectr: {}}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_text(text)
    assert info.value.path == "document[1].spec.endpointSelectr"


def test_specs_list_and_clusterwide_kind():
    text = (
        "apiVersion: cilium.io/v2\n"
        "kind: CiliumClusterwideNetworkPolicy\n"
        "metadata: {name: cw}\n"
        "specs:\n"
        "- endpointSelector: {}\n"
        "- endpointSelector: {matchLabels: {a: b}}\n"
    )
    names = [p.name for p in load_text(text)]
    assert names == ["cw#0", "cw#1"]


def test_directory_load_and_duplicate_names(tmp_path):
    (tmp_path / "a.yaml").write_text(HEAD + "spec: {endpointSelector: {}}\n")
    (tmp_path / "b.yml").write_text(
        HEAD.replace("name: p", "name: q") + "spec: {endpointSelector: {}}\n"
    )
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in load_paths([tmp_path])] == ["p", "q"]
    (tmp_path / "c.yaml").write_text(HEAD + "spec: {endpointSelector: {}}\n")
    with pytest.raises(PolicyError, match="duplicate policy name 'p'"):
        load_paths([tmp_path])


def test_bad_reload_keeps_the_last_good_policy(tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: one}}}\n")
    in_force = []
    source = PolicySource([file], in_force.append)
    source.load()
    file.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: [}}\n")
    assert source.poll() is False
    assert len(in_force) == 1 and source.last_error is not None
    assert source.last_error.file == str(file)
    file.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: two}}}\n")
    assert source.poll() is True
    assert in_force[-1][0].selector.match_labels == (("app", "two"),)


def test_a_snapshot_keeps_the_last_good_files_for_a_process_started_later(tmp_path):
    """``firewall --workers``: a worker restarted while the files are bad starts with
    the supervisor's copy of the last good ones, and reports the files' error."""
    policies = tmp_path / "policies"
    policies.mkdir()
    one = policies / "one.yaml"
    one.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: one}}}\n")
    single = tmp_path / "single.policy"  # a file named on the command line, any suffix
    single.write_text(HEAD.replace("name: p", "name: s") + "spec: {endpointSelector: {}}\n")
    snapshot = PolicySnapshot([policies, single], tmp_path / "snapshots")
    assert snapshot.refresh() is True
    assert snapshot.refresh() is False  # nothing changed
    first = snapshot.paths

    one.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: [}}\n")
    assert snapshot.refresh() is False
    assert snapshot.paths == first

    in_force: list = []
    source = PolicySource([policies, single], in_force.append)
    with pytest.raises(PolicyError):
        source.load()
    source.load_or_fall_back(snapshot.paths)
    assert sorted(p.name for p in in_force[-1]) == ["p", "s"]
    assert in_force[-1][0].selector.match_labels == (("app", "one"),)
    assert source.last_error is not None and source.last_error.file == str(one)
    # The files mended: the next poll puts them in force, as in any process.
    one.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: two}}}\n")
    assert source.poll() is True
    assert in_force[-1][0].selector.match_labels == (("app", "two"),)
    assert snapshot.refresh() is True and snapshot.paths != first


def test_cli_validate_reports_file_path_and_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        HEAD
        + "spec:\n"
        + "  endpointSelector: {}\n"
        + "  ingress: [{toPorts: [{ports: [{port: 80}], rules: {http: [{methd: GET}]}}]}]\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "l7proxy", "policy", "validate", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 1
    assert f"{bad}: spec.ingress[0].toPorts[0].rules.http[0].methd: unknown field" in run.stderr


def test_example_policies_in_the_repository_all_validate():
    files = sorted((REPO / "policies").glob("*.yaml"))
    assert files, "policies/ must hold examples"
    for file in files:
        assert load_paths([file]), file


def test_a_bad_first_load_leaves_no_policy_in_force_and_says_why(tmp_path):
    # What the agent does at start: it runs with no policy rather than not at all.
    file = tmp_path / "p.yaml"
    file.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: [}}\n")
    in_force = []
    source = PolicySource([file], in_force.append)
    assert source.reload() is False
    assert in_force == [] and (source.imports, source.import_errors) == (0, 1)
    assert source.last_error is not None and source.last_error.file == str(file)
    assert source.poll() is False  # nothing changed: not read again
    file.write_text(HEAD + "spec: {endpointSelector: {matchLabels: {app: one}}}\n")
    assert source.poll() is True
    assert source.last_error is None and len(in_force) == 1
