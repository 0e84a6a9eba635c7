# The Death Star service both UI tests put behind a firewall (PORT: the upstream's).
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deathstar-api}
spec:
  endpointSelector: {matchLabels: {app: deathstar}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/v1/.*"}
        - {method: POST, path: /v1/request-landing}
  - fromCIDR: [127.0.0.2/32]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/v1/.*"}
  ingressDeny:
  - fromCIDR: [127.0.0.3/32]
"""
