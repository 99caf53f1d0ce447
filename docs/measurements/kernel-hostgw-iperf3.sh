#!/bin/bash
# Measurement helper until `cargo xtask bench` (issue 6) replaces it. Run as root.
# One iperf3 run (4 s, one stream) pod-to-pod across two nodes that use the
# kernel's plain routes exactly as flannel's host-gw backend programs them:
# `<peer podCIDR> via <peer node IP>`, no tunnel.
set -e
P=fhg$$
cleanup() { for n in ul n1 n2 n1p1 n2p1; do ip netns del $P-$n 2>/dev/null || true; done; }
trap cleanup EXIT
ip netns add $P-ul; ip -n $P-ul link add br0 type bridge; ip -n $P-ul link set br0 up
for i in 1 2; do
  ip netns add $P-n$i; ip netns add $P-n${i}p1
  ip -n $P-ul link add n$i type veth peer name eth0 netns $P-n$i
  ip -n $P-ul link set n$i master br0 up
  ip netns exec $P-ul ethtool -K n$i tso off gso off tx-udp_tnl-segmentation off tx-udp_tnl-csum-segmentation off >/dev/null
  ip -n $P-n$i addr add 192.168.78.1$i/24 dev eth0; ip -n $P-n$i link set eth0 up; ip -n $P-n$i link set lo up; ip netns exec $P-n$i ethtool -K eth0 gro on
  ip netns exec $P-n$i sysctl -qw net.ipv4.ip_forward=1
  ip -n $P-n$i link add cni0 type bridge; ip -n $P-n$i addr add 10.244.$i.1/24 dev cni0; ip -n $P-n$i link set cni0 mtu 1450 up
  ip -n $P-n$i link add p1 mtu 1450 type veth peer name eth0 netns $P-n${i}p1
  ip -n $P-n$i link set p1 master cni0 up
  ip -n $P-n${i}p1 addr add 10.244.$i.11/24 dev eth0; ip -n $P-n${i}p1 link set eth0 mtu 1450 up; ip -n $P-n${i}p1 route add default via 10.244.$i.1
done
for i in 1 2; do j=$((3-i))
  ip -n $P-n$i route replace 10.244.$j.0/24 via 192.168.78.1$j dev eth0
done
ip netns exec $P-n2p1 iperf3 -s -D -1 -B 10.244.2.11 >/dev/null 2>&1; sleep 0.3
ip netns exec $P-n1p1 iperf3 -c 10.244.2.11 -t 4 -J 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin)["end"]["sum_sent"]; print("kernel-host-gw %.2f %d" % (d["bits_per_second"]/1e9, d["retransmits"]))'
