#!/bin/bash
# Measurement helper until `cargo xtask bench` (issue 6) replaces it. Run as root.
# usage: kernel-baseline-iperf3.sh vxlan|host-gw
# One iperf3 run (4 s, one stream) pod-to-pod across two nodes programmed
# exactly as flannel's backend does, with no BPF anywhere:
# - vxlan: the kernel vxlan device flannel.1 (VNI 1, port 8472, learning
#   off), a permanent neighbour and FDB entry and an onlink route per peer;
# - host-gw: `<peer podCIDR> via <peer node IP>`.
# The underlay is wire-like (MTU-sized frames) with GRO on, like the lab's.
set -e
backend=${1:?usage: $0 vxlan|host-gw}
P=fbl$$
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
  if [ "$backend" = vxlan ]; then
    ip -n $P-n$i link add flannel.1 address 0e:00:00:00:00:0$i type vxlan id 1 local 192.168.78.1$i dev eth0 dstport 8472 nolearning
    ip -n $P-n$i link set flannel.1 mtu 1450 up; ip -n $P-n$i addr add 10.244.$i.0/32 dev flannel.1
  fi
done
for i in 1 2; do j=$((3-i))
  if [ "$backend" = vxlan ]; then
    ip -n $P-n$i neigh replace 10.244.$j.0 lladdr 0e:00:00:00:00:0$j dev flannel.1 nud permanent
    ip netns exec $P-n$i bridge fdb append 0e:00:00:00:00:0$j dev flannel.1 dst 192.168.78.1$j self permanent
    ip -n $P-n$i route replace 10.244.$j.0/24 via 10.244.$j.0 dev flannel.1 onlink
  else
    ip -n $P-n$i route replace 10.244.$j.0/24 via 192.168.78.1$j dev eth0
  fi
done
ip netns exec $P-n2p1 iperf3 -s -D -1 -B 10.244.2.11 >/dev/null 2>&1; sleep 0.3
ip netns exec $P-n1p1 iperf3 -c 10.244.2.11 -t 4 -J 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin)["end"]["sum_sent"]; print("kernel-%s %.2f %d" % (sys.argv[1], d["bits_per_second"]/1e9, d["retransmits"]))' "$backend"
