#!/usr/bin/env bash
# Host tools of the netlink driver, idempotently (as root): nftables (`nft -j`), dnsmasq
# (DHCP/DNS per subnet; dnsmasq-base has no system service), iproute2 (`ip netns exec`),
# and, for the tests, busybox's udhcpc (a DHCP client in a namespace) and ping.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "setup-network: not root: skipping (the netlink driver's tests will skip)" >&2
  exit 0
fi
need=()
command -v nft >/dev/null || need+=(nftables)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v ip >/dev/null || need+=(iproute2)
command -v busybox >/dev/null || need+=(busybox-static)
command -v ping >/dev/null || need+=(iputils-ping)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
mkdir -p /run/netns
# br_netfilter lets nftables' inet family (and its conntrack) see bridged IPv4 traffic of
# bridges that ask for it (per bridge, nf_call_iptables); load it when it is a module
if [ ! -d /proc/sys/net/bridge ]; then
  modprobe br_netfilter 2>/dev/null || echo "setup-network: br_netfilter is not available: security groups cannot filter bridged traffic" >&2
fi
echo "setup-network: nft $(nft --version | awk '{print $2}'), dnsmasq $(dnsmasq --version | awk 'NR==1{print $3}')"
