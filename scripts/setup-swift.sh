#!/usr/bin/env bash
# OpenStack Swift all-in-one on loopback for the object-store driver, idempotently (as
# root): Debian's swift packages and memcached, config under /etc/swift, rings of one
# device (a directory of this filesystem: /srv/swift-aio/node/d1), and the proxy,
# account, container and object servers started without systemd or swift-init. No
# replicator, auditor, updater or reaper runs (one replica: nothing to replicate). So the
# account's object/byte totals and the per-container count/bytes in account listings stay
# as they were when the container was created (container HEAD/GET are exact), and a
# DELETEd account stays "Deleted" (410; a PUT is refused: 403 "Recently deleted").
#
#   setup-swift.sh          install + configure + start + wait until it answers
#   setup-swift.sh stop     stop the four servers and our memcached (by PID file)
#   setup-swift.sh status   exit 0 when the proxy answers
#
# Listens on 127.0.0.1 only: proxy 8080, object 6200, container 6201, account 6202,
# memcached 11211 (tempauth tokens). The servers run as the Debian user `swift` (started
# so with setpriv), one process each (workers = 0); memcached as `memcache`. Logs in
# /var/log/swift-aio/NAME.log, PIDs in /run/swift-aio/NAME.pid.
#
# Auth: tempauth at http://127.0.0.1:8080/auth/v1.0, reseller prefix AUTH (Swift's SAIO
# users; account AUTH_<account>):
#   admin:admin    key admin     .admin .reseller_admin (may use any account)
#   test:tester    key testing   .admin of AUTH_test
#   test2:tester2  key testing2  .admin of AUTH_test2
#   test:tester3   key testing3  no role (sees only what ACLs grant)
# S3 (s3api): access key ACCOUNT:USER (e.g. test:tester), secret = the key (testing),
# SigV4, region us-east-1, path-style addressing; S3 ACLs map to Swift ACLs (s3_acl off).
# The cluster hash prefix/suffix are random, made once and then kept (in swift.conf and
# /srv/swift-aio/hash): changing them would orphan every stored object.
set -euo pipefail

ACTION=${1:-start}
RUN=/run/swift-aio
LOG=/var/log/swift-aio
SRV=/srv/swift-aio
ETC=/etc/swift
PROXY=http://127.0.0.1:8080
SERVERS=(account-server container-server object-server proxy-server)
declare -A PORT=([object-server]=6200 [container-server]=6201 [account-server]=6202
                 [proxy-server]=8080)

case "$ACTION" in
  start|stop|status) ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac

healthy() { curl -sf -m 2 -o /dev/null "$1/healthcheck"; }

# True when pid file $RUN/$1.pid names a live process whose command line contains $2.
# Zombies count as dead (killed processes linger as zombies here: nothing reaps them).
alive() {
  local pid state
  [ -s "$RUN/$1.pid" ] || return 1
  pid=$(cat "$RUN/$1.pid")
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ "$state" != Z ] && [ "$state" != X ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}
pattern() { if [ "$1" = memcached ]; then echo memcached; else echo "$ETC/$1.conf"; fi; }

if [ "$ACTION" = status ]; then
  for s in "${SERVERS[@]}" memcached; do
    if alive "$s" "$(pattern "$s")"; then st="running (pid $(cat "$RUN/$s.pid"))"; else st="not running"; fi
    echo "setup-swift: $s: $st"
  done
  if healthy "$PROXY"; then echo "setup-swift: proxy answers on $PROXY"; exit 0; fi
  echo "setup-swift: proxy does not answer on $PROXY" >&2
  exit 1
fi

if [ "$(id -u)" != 0 ]; then
  echo "setup-swift: not root: skipping (the object-store driver's Swift tests will skip)" >&2
  exit 0
fi
export PATH="$PATH:/usr/sbin:/sbin"

# Stops $1 (by its PID file): TERM, then KILL after 10 s; done when gone or a zombie.
stop_one() {
  local name=$1 pid i
  if alive "$name" "$(pattern "$name")"; then
    pid=$(cat "$RUN/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      alive "$name" "$(pattern "$name")" || break
      [ $i = 50 ] && kill -KILL "$pid" 2>/dev/null || true
      sleep 0.1
    done
    if alive "$name" "$(pattern "$name")"; then
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -f "$RUN/$name.pid"
}

if [ "$ACTION" = stop ]; then
  for s in proxy-server object-server container-server account-server memcached; do
    stop_one "$s"
  done
  echo "setup-swift: stopped"
  exit 0
fi

T0=$SECONDS

# --- packages -------------------------------------------------------------------------
PACKAGES=(swift swift-proxy swift-account swift-container swift-object python3-swiftclient
          memcached curl)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-swift: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
getent passwd swift >/dev/null || { echo "setup-swift: user swift missing (python3-swift creates it)" >&2; exit 1; }

mkdir -p "$RUN" "$LOG" "$SRV/node/d1"
chown swift:swift "$SRV/node" "$SRV/node/d1"

# --- config -----------------------------------------------------------------------------
changed=()
# Writes stdin to $1 (mode $2, owner $3) only when the content differs.
put() {
  local path=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$path"
    changed+=("$(basename "$path")")
  fi
  chmod "$mode" "$path"
  chown "$owner" "$path"
}

# The hash prefix/suffix: made once, then never changed (kept beside the data too).
ini_value() { sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$2" 2>/dev/null | head -n1; }
rand() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
if [ -s "$SRV/hash" ]; then
  read -r HASH_PREFIX HASH_SUFFIX <"$SRV/hash"
else
  HASH_PREFIX=$(ini_value swift_hash_path_prefix "$ETC/swift.conf")
  HASH_SUFFIX=$(ini_value swift_hash_path_suffix "$ETC/swift.conf")
  case "$HASH_PREFIX" in ''|changeme) HASH_PREFIX=$(rand) ;; esac
  case "$HASH_SUFFIX" in ''|changeme) HASH_SUFFIX=$(rand) ;; esac
  (umask 077; echo "$HASH_PREFIX $HASH_SUFFIX" >"$SRV/hash")
fi

mkdir -p "$ETC"
put "$ETC/swift.conf" 0640 root:swift <<EOF
# Written by reconciler's scripts/setup-swift.sh (Swift all-in-one on loopback).
# Never change the hash prefix/suffix: every object's location depends on them.
[swift-hash]
swift_hash_path_prefix = $HASH_PREFIX
swift_hash_path_suffix = $HASH_SUFFIX

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
EOF

server_conf() {
  local s=$1
  cat <<EOF
# Written by reconciler's scripts/setup-swift.sh (Swift all-in-one on loopback).
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = ${PORT[$s-server]}
workers = 0
user = swift
swift_dir = $ETC
devices = $SRV/node
mount_check = false
log_name = $s-server

[pipeline:main]
pipeline = healthcheck $s-server

[filter:healthcheck]
use = egg:swift#healthcheck

[app:$s-server]
use = egg:swift#$s

[$s-replicator]

[$s-auditor]
EOF
  case $s in
    account) printf '\n[account-reaper]\n' ;;
    container) printf '\n[container-updater]\n\n[container-sync]\n' ;;
    object) printf '\n[object-updater]\n\n[object-reconstructor]\n' ;;
  esac
}
for s in account container object; do
  put "$ETC/$s-server.conf" 0644 root:swift < <(server_conf "$s")
done

put "$ETC/proxy-server.conf" 0640 root:swift <<'EOF'
# Written by reconciler's scripts/setup-swift.sh (Swift all-in-one on loopback).
# Pipeline order after Swift's example proxy-server.conf: s3api just before tempauth,
# slo after s3api (multipart uploads), versioned_writes after slo/dlo and before symlink
# (the X-Versions-Enabled object-versioning API needs symlink).
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = 8080
workers = 0
user = swift
swift_dir = /etc/swift
log_name = proxy-server

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl s3api tempauth copy container_quotas account_quotas slo dlo versioned_writes symlink proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:11211

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:bulk]
use = egg:swift#bulk

[filter:tempurl]
use = egg:swift#tempurl

[filter:s3api]
use = egg:swift#s3api
location = us-east-1
s3_acl = false

[filter:tempauth]
use = egg:swift#tempauth
reseller_prefix = AUTH
user_admin_admin = admin .admin .reseller_admin
user_test_tester = testing .admin
user_test2_tester2 = testing2 .admin
user_test_tester3 = testing3

[filter:copy]
use = egg:swift#copy

[filter:container_quotas]
use = egg:swift#container_quotas

[filter:account_quotas]
use = egg:swift#account_quotas

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes
allow_versioned_writes = true
allow_object_versioning = true

[filter:symlink]
use = egg:swift#symlink
EOF

# --- rings (one device, one replica; only when missing) ---------------------------------
for s in account container object; do
  if [ ! -s "$ETC/$s.ring.gz" ]; then
    rm -f "$ETC/$s.builder"
    (
      cd "$ETC"
      swift-ring-builder "$s.builder" create 8 1 1 >/dev/null
      swift-ring-builder "$s.builder" add "r1z1-127.0.0.1:${PORT[$s-server]}/d1" 100 >/dev/null
      swift-ring-builder "$s.builder" rebalance >/dev/null || [ $? = 1 ]   # 1: warnings only
    )
    chmod 0644 "$ETC/$s.ring.gz"
    changed+=("$s.ring.gz")
  fi
done

# --- processes -------------------------------------------------------------------------
memcached_answers() {
  local line=
  { exec 3<>/dev/tcp/127.0.0.1/11211; } 2>/dev/null || return 1
  printf 'version\r\n' >&3
  read -r -t 2 line <&3 || true
  exec 3>&-
  [[ $line == VERSION* ]]
}
# Starts $1 in the background in its own session; records its PID.
launch() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$LOG/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

if ! memcached_answers; then
  stop_one memcached
  launch memcached memcached -u memcache -l 127.0.0.1 -p 11211 -U 0 -m 64 -c 1024
fi

restarted=()
for s in "${SERVERS[@]}"; do
  # a changed swift.conf, ring or own config: restart that server
  need_restart=
  for f in "${changed[@]}"; do
    case "$f" in
      swift.conf|"$s.conf") need_restart=1 ;;
      *.ring.gz) [ "$s" = proxy-server ] || [ "$f" = "${s%-server}.ring.gz" ] && need_restart=1 ;;
    esac
  done
  if alive "$s" "$(pattern "$s")"; then
    [ -n "$need_restart" ] || continue
    stop_one "$s"
    restarted+=("$s")
  fi
  rm -f "$RUN/$s.pid"
  # As user swift from the start: with workers = 0 Swift never drops privileges itself
  # (only forked workers do). -v: log to stderr (the log file) too; there is no syslog.
  launch "$s" setpriv --reuid=swift --regid=swift --init-groups "swift-$s" "$ETC/$s.conf" -v
done

# --- wait until it answers --------------------------------------------------------------
auth_ok() {
  local hdrs token url
  hdrs=$(curl -sf -m 5 -D - -o /dev/null -H 'X-Auth-User: admin:admin' -H 'X-Auth-Key: admin' \
    "$PROXY/auth/v1.0") || return 1
  token=$(sed -n 's/^[Xx]-[Aa]uth-[Tt]oken: *//p' <<<"$hdrs" | tr -d '\r')
  url=$(sed -n 's/^[Xx]-[Ss]torage-[Uu]rl: *//p' <<<"$hdrs" | tr -d '\r')
  [ -n "$token" ] && [ -n "$url" ] || return 1
  curl -sf -m 5 -o /dev/null -I -H "X-Auth-Token: $token" "$url"
}
fail() {
  echo "setup-swift: $1" >&2
  for s in memcached "${SERVERS[@]}"; do
    [ -f "$LOG/$s.log" ] && { echo "--- $LOG/$s.log" >&2; tail -n 20 "$LOG/$s.log" >&2; }
  done
  exit 1
}
deadline=$((SECONDS + 60))
while true; do
  ok=1
  for s in "${SERVERS[@]}"; do
    alive "$s" "$(pattern "$s")" || fail "swift-$s exited (see its log below)"
    healthy "http://127.0.0.1:${PORT[$s]}" || ok=
  done
  memcached_answers || ok=
  [ -n "$ok" ] && auth_ok && break
  [ $SECONDS -lt $deadline ] || fail "Swift did not answer within 60 s ($PROXY/healthcheck, auth as admin:admin, HEAD of its account)"
  sleep 0.3
done

version=$(dpkg-query -W -f='${Version}' python3-swift 2>/dev/null | sed 's/-.*//')
extra=
[ ${#restarted[@]} -gt 0 ] && extra=" (restarted for new config: ${restarted[*]})"
echo "setup-swift: swift ${version:-unknown} on 127.0.0.1:8080 (auth /auth/v1.0, s3api), ready in $((SECONDS - T0)) s$extra"
