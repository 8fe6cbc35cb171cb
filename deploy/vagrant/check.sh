#!/usr/bin/env bash
# Connectivity checks, run on cp1 (`vagrant provision cp1 --provision-with
# check`): one busybox pod per node, then pod to pod on the same and other
# nodes, pod to ClusterIP service, node to pod, and every agent's metrics.
set -euo pipefail
export KUBECONFIG=/etc/kubernetes/admin.conf
NS=patchcord-check

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" apply -f - <<'EOT'
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: echo
spec:
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      tolerations: [{operator: Exists}]
      containers:
        - name: echo
          image: docker.io/library/busybox:1.36
          command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
EOT
kubectl -n "$NS" rollout status daemonset/echo --timeout=5m

fail=0
check() { # description, command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then echo "ok    $what"; else echo "FAIL  $what"; fail=1; fi
}
mapfile -t pods < <(kubectl -n "$NS" get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name},{.status.podIP},{.spec.nodeName}{"\n"}{end}')
svc=$(kubectl -n "$NS" get service echo -o jsonpath='{.spec.clusterIP}')
for from in "${pods[@]}"; do
  IFS=, read -r fname fip fnode <<<"$from"
  for to in "${pods[@]}"; do
    IFS=, read -r tname tip tnode <<<"$to"
    [ "$fname" = "$tname" ] && continue
    check "ping   $fnode -> $tnode ($tip)" kubectl -n "$NS" exec "$fname" -- ping -c 3 -W 2 "$tip"
    check "http   $fnode -> $tnode ($tip)" kubectl -n "$NS" exec "$fname" -- wget -q -T 5 -O - "http://$tip:8080/"
  done
  check "http   $fnode -> service $svc" kubectl -n "$NS" exec "$fname" -- wget -q -T 5 -O - "http://$svc/"
  check "http   cp1 (node) -> $fnode ($fip)" curl -fsS -m 5 "http://$fip:8080/"
done
for ip in $(kubectl get nodes -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{" "}{end}'); do
  check "metrics $ip:9964 patchcord_endpoints" sh -c "curl -fsS -m 5 http://$ip:9964/metrics | grep -q '^patchcord_endpoints '"
done
kubectl -n kube-system exec ds/patchcord -c agent -- patchcord bpf stats || true

if [ "$fail" = 0 ]; then
  echo "all checks passed"
  kubectl delete namespace "$NS" --wait=false
else
  echo "some checks failed; pods left in namespace $NS for a look"
  exit 1
fi
