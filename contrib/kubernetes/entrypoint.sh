#!/bin/bash
# The DaemonSet's process: one `rulebpf run` per instance file of the
# ConfigMap (NAME.ini -> instance NAME, reloaded when the ConfigMap
# changes), then, once every instance is loaded, the NRI plugin. If any of
# them ends, the container ends and the kubelet restarts it: pinned state
# keeps the rules of running pods in force meanwhile.
set -eu

dir=${RULEBPF_INSTANCES:-/etc/rulebpf/instances}
port=${RULEBPF_METRICS_PORT:-9464}
names=""
for file in "$dir"/*.ini; do
    [ -e "$file" ] || continue
    name=$(basename "$file" .ini)
    rulebpf run --name "$name" --metrics-listen "0.0.0.0:$port" "$file" &
    names="$names $name"
    port=$((port + 1))
done

# A pod must never start before its instance exists: the plugin would
# refuse it ("no instance"), and the kubelet would retry, but a ready
# plugin with missing instances is a configuration error to see at once.
for name in $names; do
    tries=0
    until rulebpf status --json | grep -q "\"name\": *\"$name\""; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || { echo "instance $name not loaded after 30 s" >&2; exit 1; }
        sleep 0.1
    done
done

# The guard on the pods' parent cgroup (kubepods.slice with the systemd
# cgroup driver, kubepods with cgroupfs): pods started while the plugin is
# away are refused until it is back.
rulebpf nri --socket "${NRI_SOCKET:-/var/run/nri/nri.sock}" \
    --guard "${RULEBPF_GUARD:-kubepods.slice}" \
    --ready-file /run/rulebpf/nri-ready ${RULEBPF_SELECTOR:+--selector "$RULEBPF_SELECTOR"} \
    ${RULEBPF_NAMESPACES:+$(printf -- '--namespace %s ' $RULEBPF_NAMESPACES)} &

# The first of them to end ends the container.
wait -n
exit 1
