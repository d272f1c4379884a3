#!/bin/sh
# Runs a command (podman ...) where /sys/fs/cgroup is cgroup v2, also on a
# hybrid host.
#
#   rulebpf-loader/tests/containers/podman-cgroup2.sh podman --cgroup-manager cgroupfs run ...
#
# Why: rulebpf's hooks are cgroup v2 programs (BPF_CGROUP_INET4_CONNECT on a
# cgroup2 directory), so a container must live in a cgroup2 cgroup. podman
# and crun/runc decide the cgroup version from the file system type of
# /sys/fs/cgroup (statfs: CGROUP2_SUPER_MAGIC or not). On a hybrid host that
# is a tmpfs of v1 hierarchies with cgroup2 at /sys/fs/cgroup/unified, so they
# drive cgroup v1. runc 1.1 then still gives the container a cgroup in the
# unified hierarchy too (its `0::` line), which the hook can use; crun 1.8
# refuses outright as long as any controller is enabled in cgroup2 ("cgroups
# in hybrid mode not supported, drop all controllers from cgroupv2"; here
# hugetlb is).
#
# The cure, with nothing changed on the host: a private mount namespace in
# which the v1 tree is unmounted and the one cgroup2 hierarchy is mounted at
# /sys/fs/cgroup. podman, conmon, the runtime and the OCI hooks they start all
# inherit that namespace, so they see a pure cgroup v2 host. It is the same
# hierarchy as /sys/fs/cgroup/unified (cgroup2 has exactly one): a cgroup
# made in here is /sys/fs/cgroup/unified/<same path> outside, with the same
# cgroup id (inode), so rules attached in here are the host's rules.
#
# Both runtimes then see what a current distribution has (pure cgroup v2).
# Limits of that hierarchy: controllers bound to v1 (pids, memory, cpu, ...)
# are not available in it; run containers with `--pids-limit -1` and no
# resource limits. Paths differ from the host's view (/sys/fs/cgroup/X in
# here is /sys/fs/cgroup/unified/X outside; ids are equal), so what rulebpf
# records in here names paths of this namespace.
# On a pure cgroup v2 host this script runs the command as is.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    exec "$@"
fi
if ! grep -q ' cgroup2 ' /proc/mounts; then
    echo "$0: no cgroup2 mount on this host; rulebpf needs cgroup v2" >&2
    exit 1
fi
# --propagation private: the umount and mount below stay in the namespace.
exec unshare --mount --propagation private /bin/sh -eu -c '
    umount --recursive --lazy /sys/fs/cgroup
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    exec "$@"' podman-cgroup2 "$@"
