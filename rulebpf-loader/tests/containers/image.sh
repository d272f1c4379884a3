#!/bin/sh
# Builds the local image the container tests run, with no registry:
# a root file system of one static busybox (sh, nc, wget, ...) imported
# into podman's storage as localhost/rulebpf-busybox. Idempotent: an
# existing image is kept (pass --rebuild to replace it).
#
#   rulebpf-loader/tests/containers/image.sh [--rebuild]
#
# Needs podman and Debian's busybox-static (its /bin/busybox is linked
# statically, so the image needs no libraries).
set -eu

IMAGE=${RULEBPF_TEST_IMAGE:-localhost/rulebpf-busybox}
BUSYBOX=${BUSYBOX:-/bin/busybox}

if [ "${1:-}" != --rebuild ] && podman image exists "$IMAGE"; then
    exit 0
fi
if [ ! -x "$BUSYBOX" ]; then
    echo "$0: $BUSYBOX not found: apt-get install busybox-static" >&2
    exit 1
fi
# A dynamically linked busybox would fail inside the image ("not found").
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "$0: $BUSYBOX is dynamically linked: apt-get install busybox-static" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
tar -C "$root" -cf "$work/rootfs.tar" .
podman import --quiet --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' \
    "$work/rootfs.tar" "$IMAGE" >/dev/null
echo "built $IMAGE" >&2
