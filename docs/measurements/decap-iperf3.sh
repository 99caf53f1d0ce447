#!/bin/bash
# Measurement helper until `cargo xtask bench` (issue 6) replaces it. Run as root.
# usage: decap-iperf3.sh DECAP REPEATS [LAB ARGS...]  -> one line per run: label gbps retrans
decap=$1; n=$2; shift 2
label="$decap${*:+ $*}"
cd "$(dirname "$0")/../.."
trap 'cargo xtask lab -- --down >/dev/null 2>&1' EXIT
cargo xtask lab -- --keep --decap $decap "$@" 2>&1 | grep -E '^lab: [0-9]' >&2
P=$(ip netns list | awk '{print $1}' | grep -- '-n1p1$' | sed 's/-n1p1//')
for i in $(seq 1 $n); do
  ip netns exec $P-n2p1 iperf3 -s -D -1 -B 10.244.2.11 >/dev/null 2>&1; sleep 0.3
  ip netns exec $P-n1p1 iperf3 -c 10.244.2.11 -t 4 -J 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin)["end"]["sum_sent"]; print("%s %.2f %d" % (sys.argv[1], d["bits_per_second"]/1e9, d["retransmits"]))' "$label"
done

