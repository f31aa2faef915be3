#!/bin/sh
# CGI /cgi-bin/info: what the guest sees, one key=value per line, for host-side checks.
printf 'Content-Type: text/plain\r\n\r\n'
echo "hostname=$(hostname)"
echo "nproc=$(nproc)"
echo "memtotal_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
ip -o -4 addr show | awk '$2 != "lo" {print "ip=" $2 "," $4}'
for n in /sys/class/net/*; do
  [ "${n##*/}" = lo ] || echo "mtu=${n##*/},$(cat "$n/mtu")"
done
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  echo "disk=${b##*/},$(cat "$b/serial" 2>/dev/null),$(( $(cat "$b/size") * 512 ))"
done
