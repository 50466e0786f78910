#!/usr/bin/env bash
# Installs ferry's .deb on this machine and checks every deploy artifact with the real
# tools (run by scripts/test.sh; needs root):
#   1. scripts/package.sh, then `apt-get install ./ferry_*.deb`: binaries, units, config,
#      manual pages, completions, the ferry user;
#   2. systemd-analyze verify and security (exposure at most 4.0) on the installed units;
#   3. ferryd started from the installed unit's own ExecStartPre/ExecStart lines, as the
#      unit runs it (user ferry, CAP_IPC_LOCK only); `ferryctl status` from a member of
#      group ferry answers, from another user is refused; SIGTERM ends it with 0;
#   4. the kustomize tree: kubectl kustomize | kubernetes-validate --strict, then
#      scripts/check-k8s.py; the seccomp profile is current (scripts/gen-seccomp.py);
#   5. the container image (scripts/build-image.sh): ferryd starts in it under ferry's
#      seccomp profile with only IPC_LOCK, answers `ferryctl status` from the host, and
#      stops with 0;
#   6. `apt-get purge ferry` removes it again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "SKIP: deploy checks need root (they install the package and run ferryd as its user)"
  exit 0
fi
# It installs and purges the package: a host where ferry is installed for real is left alone.
if dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -q "install ok installed"; then
  echo "SKIP: deploy checks: the ferry package is installed on this host; they would replace and purge it"
  exit 0
fi
say() { echo "deploy: $*"; }
work=$(mktemp -d)
ferryd_pid=""
made_key=""
cleanup() {
  [ -n "$made_key" ] && rm -f "$made_key"
  [ -n "$ferryd_pid" ] && kill "$ferryd_pid" 2>/dev/null || true
  podman rm -f ferry-deploy-check >/dev/null 2>&1 || true
  rm -rf "$work" /run/ferry
  if dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -q "install ok installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq ferry >/dev/null || true
  fi
}
trap cleanup EXIT

# 1. The package.
deb=$(scripts/package.sh | tail -1)
say "built $deb ($(du -h "$deb" | cut -f1))"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./${deb#"$PWD"/}" >/dev/null
for f in /usr/bin/ferryd /usr/bin/ferryctl /lib/systemd/system/ferryd.service /etc/ferry/ferry.toml \
         /usr/share/man/man1/ferryd.1.gz /usr/share/man/man1/ferryctl-send.1.gz \
         /usr/share/bash-completion/completions/ferryctl /usr/share/ferry/seccomp/ferry.json; do
  [ -e "$f" ] || { echo "deploy: the package did not install $f" >&2; exit 1; }
done
id ferry >/dev/null
say "installed: $(/usr/bin/ferryd --version)"

# 2. The units.
systemd-analyze verify /lib/systemd/system/ferryd.service /lib/systemd/system/ferry-hugepages.service
security=$(systemd-analyze security --offline=yes --threshold=40 /lib/systemd/system/ferryd.service | tail -1) \
  || { systemd-analyze security --offline=yes /lib/systemd/system/ferryd.service >&2; echo "deploy: ferryd.service is exposed above 4.0" >&2; exit 1; }
say "systemd-analyze verify ok; security: ${security#→ }"

# 3. ferryd from the unit's own command lines, as the unit runs it. systemd would create
# the runtime and state directories, lift RLIMIT_MEMLOCK (here CAP_IPC_LOCK does; raising
# the hard limit needs CAP_SYS_RESOURCE, which this machine's root may lack) and keep
# only CAP_IPC_LOCK; setpriv does the same.
unit=/lib/systemd/system/ferryd.service
install -d -o ferry -g ferry -m 0751 /run/ferry
install -d -o ferry -g ferry -m 0750 /var/lib/ferry
# A key of this host's own is left alone; one made for the check goes with it.
if [ ! -e /etc/ferry/ferry.key ]; then
  /usr/bin/ferryctl keygen --out /etc/ferry/ferry.key >/dev/null
  made_key=/etc/ferry/ferry.key
fi
chown ferry:ferry /etc/ferry/ferry.key
# Replaces the (sub)shell it runs in: `( as_unit ... ) &` leaves $! the command's pid.
as_unit() {
  prlimit --memlock=unlimited:unlimited true 2>/dev/null && set -- prlimit --memlock=unlimited:unlimited "$@"
  exec setpriv --reuid=ferry --regid=ferry --init-groups --inh-caps=+ipc_lock --ambient-caps=+ipc_lock --bounding-set=-all,+ipc_lock "$@"
}
while IFS= read -r line; do
  (as_unit sh -c "$line") > "$work/pre.log" 2>&1 || { cat "$work/pre.log" >&2; echo "deploy: ExecStartPre failed: $line" >&2; exit 1; }
done < <(sed -n 's/^ExecStartPre=//p' "$unit")
(as_unit sh -c "exec $(sed -n 's/^ExecStart=//p' "$unit")") > "$work/ferryd.log" 2>&1 &
ferryd_pid=$!
for _ in $(seq 100); do grep -q "ferryd ready" "$work/ferryd.log" && break; sleep 0.1; done
grep -q "ferryd ready" "$work/ferryd.log" || { cat "$work/ferryd.log" >&2; echo "deploy: ferryd from the unit did not get ready" >&2; exit 1; }
setpriv --reuid=nobody --regid=ferry --clear-groups /usr/bin/ferryctl status --socket /run/ferry/ferryd.sock --json > "$work/status.json"
grep -q '"ok": true' "$work/status.json" || { cat "$work/status.json" >&2; exit 1; }
if setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/ferryctl status --socket /run/ferry/ferryd.sock >/dev/null 2>&1; then
  echo "deploy: a user outside group ferry reached the control socket" >&2; exit 1
fi
curl -sf http://127.0.0.1:9464/readyz >/dev/null
kill -TERM "$ferryd_pid"
wait "$ferryd_pid" || { cat "$work/ferryd.log" >&2; echo "deploy: ferryd did not exit 0 on SIGTERM" >&2; exit 1; }
ferryd_pid=""
say "ferryd ran from ferryd.service's command lines as user ferry: status answered group ferry, refused others; SIGTERM: exit 0"

# 4. Kubernetes.
venv=${XDG_CACHE_HOME:-$HOME/.cache}/ferry-ci/venv
[ -x "$venv/bin/kubernetes-validate" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet kubernetes-validate; }
if ! command -v kubectl >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
cp -r deploy "$work/deploy"
rm -f "$work/deploy/ferry.key"
/usr/bin/ferryctl keygen --out "$work/deploy/ferry.key" >/dev/null
kubectl kustomize "$work/deploy" > "$work/k8s.yaml"
"$venv/bin/kubernetes-validate" --strict --quiet "$work/k8s.yaml"
python3 scripts/check-k8s.py deploy/prometheus/ferry-rules.yaml < "$work/k8s.yaml"
python3 scripts/gen-seccomp.py "$work/seccomp.json"
cmp -s "$work/seccomp.json" deploy/kubernetes/seccomp-ferry.json || { echo "deploy: deploy/kubernetes/seccomp-ferry.json is stale: run scripts/gen-seccomp.py" >&2; exit 1; }
say "kustomize tree: $(grep -c '^kind:' "$work/k8s.yaml") objects, kubernetes-validate --strict ok (the PodMonitor and PrometheusRule CRDs have no schema there: check-k8s.py and promtool check them)"

# 5. The image.
image=$(scripts/build-image.sh "$deb" | tail -1)
install -d -m 0755 "$work/run" "$work/key"
/usr/bin/ferryctl keygen --out "$work/key/ferry.key" >/dev/null
# runc: crun refuses this machine's hybrid cgroups. The rlimits podman would set by
# default exceed what this machine's root may raise.
podman --runtime runc run -d --name ferry-deploy-check --network host --read-only \
  --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
  --cap-drop all --cap-add IPC_LOCK --security-opt seccomp="$PWD/deploy/kubernetes/seccomp-ferry.json" \
  -v "$work/run:/run/ferry" -v "$work/key:/etc/ferry/key:ro" "$image" \
  sh -c 'ferryctl doctor --config /etc/ferry/ferry.toml >/dev/null && ferryctl tune --json --config /etc/ferry/ferry.toml > /run/ferry/plan.json && exec ferryd --plan /run/ferry/plan.json --key /etc/ferry/key/ferry.key --control /run/ferry/ferryd.sock --control-mode 0600 --metrics 127.0.0.1:9465' >/dev/null
for _ in $(seq 100); do [ -S "$work/run/ferryd.sock" ] && break; sleep 0.1; done
target/release/ferryctl status --socket "$work/run/ferryd.sock" --json > "$work/image-status.json" \
  || { podman logs ferry-deploy-check >&2; echo "deploy: ferryd in the image did not answer" >&2; exit 1; }
# Into a file first: `podman logs | grep -q` under pipefail fails when grep has matched and
# left before podman finished writing (SIGPIPE).
podman logs ferry-deploy-check > "$work/image.log" 2>&1
grep -q "transport tcp (io_uring)" "$work/image.log" || { cat "$work/image.log" >&2; echo "deploy: io_uring blocked in the image under ferry's seccomp profile" >&2; exit 1; }
podman stop -t 20 ferry-deploy-check >/dev/null
code=$(podman inspect ferry-deploy-check --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { podman logs ferry-deploy-check >&2; echo "deploy: ferryd in the image exited $code on SIGTERM" >&2; exit 1; }
# Under the runtime's default profile instead, doctor names the profile as the block.
podman --runtime runc run --rm --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 "$image" \
  ferryctl doctor --config /etc/ferry/ferry.toml > "$work/doctor-default.txt" 2>&1 || true
grep -q "io_uring.*seccomp" "$work/doctor-default.txt" || { cat "$work/doctor-default.txt" >&2; echo "deploy: doctor under the default profile did not name seccomp" >&2; exit 1; }
say "image $image ($(du -h target/image/*.oci.tar | cut -f1) OCI archive): ferryd up under ferry's seccomp profile with io_uring, answered status, SIGTERM: exit 0; under the default profile doctor names seccomp as io_uring's block"

# 6. Removal.
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq ferry >/dev/null
[ ! -e /usr/bin/ferryd ] && [ ! -e /lib/systemd/system/ferryd.service ] || { echo "deploy: purge left files behind" >&2; exit 1; }
say "ok"
