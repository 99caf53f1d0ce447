#!/bin/sh
# Builds the overlay-agent image without any registry.
#
#   deploy/build-image.sh [--agent PATH] [--tag IMAGE]
#
# No base image can be pulled, so the base is assembled here: the agent
# (default target/release/overlay-agent; build it first with
# `cargo xtask build --release`) and the commands it runs — nft (the
# masquerade table), iptables-nft and iptables-legacy (FORWARD accept
# rules) — each with the shared libraries `ldd` names, copied from this
# machine (Debian) into target/image/rootfs. (Routes, links and the pod
# bridge's FDB go over rtnetlink: no ip or bridge.) deploy/Containerfile
# then copies that tree into an image FROM scratch; .containerignore keeps
# the rest of the repository out of the build context.
#
# Tag and push for a cluster, then put the tag where the manifests name
# the image (deploy/overlay.yaml's `kernel-check` and `agent` containers,
# deploy/uninstall.yaml's `cleanup`):
#
#   deploy/build-image.sh --tag registry.example.com/overlay/overlay-agent:0.1.0
#   podman push registry.example.com/overlay/overlay-agent:0.1.0
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
agent=$root/target/release/overlay-agent
tag=localhost/overlay-agent:0.1.0
while [ $# -gt 0 ]; do
    case $1 in
        --agent) agent=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        *) echo "usage: $0 [--agent PATH] [--tag IMAGE]" >&2; exit 2 ;;
    esac
done
[ -x "$agent" ] || { echo "$agent: no agent binary; run \`cargo xtask build --release\` first" >&2; exit 1; }
for tool in nft xtables-nft-multi xtables-legacy-multi podman; do
    command -v $tool >/dev/null || { echo "$tool not found: run \`cargo xtask setup\` (Debian: nftables, iptables, podman)" >&2; exit 1; }
done

stage=$root/target/image/rootfs
rm -rf "$stage"
mkdir -p "$stage/usr/local/bin" "$stage/usr/sbin" "$stage/run" "$stage/tmp" "$stage/etc"

# Copies files to the same paths under the stage, with every library they
# load (and the dynamic loader).
copy_with_libs() {
    for file in "$@"; do
        cp -L --parents "$file" "$stage"
        ldd "$file" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
            while read -r lib; do
                [ -e "$stage$lib" ] || cp -L --parents "$lib" "$stage"
            done
    done
}

cp "$agent" "$stage/usr/local/bin/overlay-agent"
# A debug build carries ~170 MB of debug info the image does not need.
strip "$stage/usr/local/bin/overlay-agent"
copy_with_libs "$stage/usr/local/bin/overlay-agent"
# ldd names the staged agent's libraries by their host paths: copy those.
copy_with_libs "$(command -v nft)" "$(command -v xtables-nft-multi)" "$(command -v xtables-legacy-multi)"
xtables=$(dirname "$(ldd "$(command -v xtables-nft-multi)" | awk '/libxtables/ { print $3 }')")/xtables
copy_with_libs "$xtables"/*.so
# Cleaned paths: the stage's own copy of the agent is not a host path.
rm -rf "$stage$stage"
for name in iptables-nft iptables-nft-save iptables-nft-restore; do
    ln -sf xtables-nft-multi "$stage/usr/sbin/$name"
done
for name in iptables-legacy iptables-legacy-save iptables-legacy-restore; do
    ln -sf xtables-legacy-multi "$stage/usr/sbin/$name"
done
printf 'root:x:0:0:root:/:/usr/local/bin/overlay-agent\n' > "$stage/etc/passwd"

podman build --quiet -f "$root/deploy/Containerfile" -t "$tag" "$root"
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "built $tag ($size bytes)"
