#!/usr/bin/env bash
# End-to-end demo: start the mock server, register an agent, run it for a while, and
# tell what happened. Usage: scripts/demo.sh [DIR-WITH-BINARIES]   (default target/debug)
set -euo pipefail

bindir=${1:-target/debug}
agent="$bindir/wazuh-agent"
mock="$bindir/wazuh-mock-server"
run_for=${DEMO_SECONDS:-8}
for b in "$agent" "$mock"; do
  [ -x "$b" ] || { echo "demo: $b is missing; run 'cargo build --workspace' first" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/wazuh-agent-demo.XXXXXX")
mock_pid=""
agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; fi
  if [ -n "$mock_pid" ]; then kill "$mock_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p" "$2"; }

# Plain-HTTP GET against the mock's admin port, with bash's /dev/tcp (no curl needed).
admin_get() {
  exec 3<>"/dev/tcp/127.0.0.1/$admin_port"
  printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$1" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

# POST a JSON body to the mock's admin port.
admin_post() {
  exec 3<>"/dev/tcp/127.0.0.1/$admin_port"
  printf 'POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
    "$1" "${#2}" "$2" >&3
  cat <&3 >/dev/null
  exec 3<&-
}

# Waits (up to 20 s) until the mock has a result for command $1; prints it.
wait_result() {
  for _ in $(seq 1 200); do
    r=$(admin_get /admin/state | grep -o "{\"code\":[0-9-]*,\"id\":\"$1\",\"message\":\"[^\"]*\"}" || true)
    [ -n "$r" ] && { echo "$r"; return 0; }
    sleep 0.1
  done
  echo "no result for command $1" >&2
  return 1
}

say "starting the mock Wazuh server (comms + management API over TLS, tokens live 6 s)"
"$mock" --dir "$work/mock" --token-lifetime 6 --command-hold 5 --password demo-password >"$work/mock.json" 2>"$work/mock.err" &
mock_pid=$!
for _ in $(seq 1 100); do [ -s "$work/mock.json" ] && break; sleep 0.05; done
[ -s "$work/mock.json" ] || { echo "demo: the mock server did not start:" >&2; cat "$work/mock.err" >&2; exit 1; }
comms_url=$(field comms_url "$work/mock.json")
mgmt_url=$(field management_url "$work/mock.json")
admin_port=$(field admin "$work/mock.json")
echo "comms API $comms_url, management API $mgmt_url"

# A small host tree for the inventory scan (the demo should not depend on this machine).
mkdir -p "$work/host/etc" "$work/host/var/lib/dpkg" "$work/logs"
printf 'NAME="Debian GNU/Linux"\nVERSION="12 (bookworm)"\nID=debian\n' >"$work/host/etc/os-release"
printf 'Package: openssl\nStatus: install ok installed\nArchitecture: amd64\nVersion: 3.0.13-1\nInstalled-Size: 2296\nDescription: Secure Sockets Layer toolkit\n\nPackage: curl\nStatus: install ok installed\nArchitecture: amd64\nVersion: 7.88.1-10\n' \
  >"$work/host/var/lib/dpkg/status"

cat >"$work/agent.toml" <<TOML
[agent]
name = "demo-agent"
data_dir = "$work/data"
run_dir = "$work/run"
[server]
url = "$comms_url"
registration_url = "$mgmt_url"
ca_file = "$work/mock/ca.pem"
[logcollector]
files = ["$work/logs/*.log"]
start = "beginning"
poll_interval = "200ms"
[inventory]
root = "$work/host"
collectors = ["system", "packages"]
[fim]
enabled = true
root = "$work/host"
paths = [{ path = "/etc", realtime = true }]
[log]
level = "info"
file = "$work/agent.log"
TOML
echo "Nov 26 15:00:05 web-01 kernel: demo line followed by the logcollector" >"$work/logs/app.log"

say "registering (wazuh-agent --register), password from WAZUH_REGISTRATION_PASSWORD"
uuid=$(WAZUH_REGISTRATION_PASSWORD=demo-password "$agent" --config "$work/agent.toml" --register --user wazuh)
echo "registered agent UUID: $uuid"
echo "credentials: $(stat -c '%A %n' "$work/data/credentials.json")"

say "running the agent for $run_for seconds"
"$agent" --config "$work/agent.toml" &
agent_pid=$!
for _ in $(seq 1 100); do [ -S "$work/run/ingest.sock" ] && break; sleep 0.05; done

say "sending events with wazuh-agent --send (3 stateless, 2 stateful, 1 malformed)"
set +e
reply=$("$agent" --config "$work/agent.toml" --send <<'EVENTS'
{"header":{"module":"logcollector","collector":"file"},"data":{"event":{"original":"Nov 26 15:00:00 web-01 sshd[811]: Accepted publickey for root"},"log":{"file":{"path":"/var/log/auth.log"}}}}
{"header":{"module":"logcollector","collector":"file"},"data":{"event":{"original":"Nov 26 15:00:01 web-01 CRON[900]: session opened"},"log":{"file":{"path":"/var/log/auth.log"}}}}
{"header":{"module":"logcollector","collector":"file"},"data":{"event":{"original":"Nov 26 15:00:02 web-01 sudo: demo : TTY=pts/0 ; COMMAND=/bin/true"},"log":{"file":{"path":"/var/log/auth.log"}}}}
{"header":{"module":"inventory","collector":"packages","operation":"create","id":"6641e6"},"data":{"package":{"name":"openssl","version":"3.0.13-1","architecture":"amd64","type":"deb"}}}
{"header":{"module":"inventory","collector":"packages","operation":"delete","id":"0a1b2c"}}
{"header":{"module":"inventory","collector":"packages","operation":"upsert","id":"x"},"data":{}}
EVENTS
)
send_status=$?
set -e
echo "agent replied: $reply (exit status $send_status: 1 because one line was rejected)"

say "commands from the server: set-group, then restart (long-poll GET /api/v1/commands)"
admin_post /admin/files '{"name": "demo.yml", "content": "events:\n  batch_interval: 500ms\n"}'
admin_post /admin/commands "{\"agent\": \"$uuid\", \"command\": {\"document_id\": \"demo-set-group\", \"action\": {\"name\": \"set-group\", \"args\": {\"groups\": [\"demo\"]}}, \"timeout\": 30, \"status\": \"pending\"}}"
echo "set-group result: $(wait_result demo-set-group)"
echo "shared group files: $(ls "$work/data/shared/")"
admin_post /admin/commands "{\"agent\": \"$uuid\", \"command\": {\"document_id\": \"demo-restart\", \"action\": {\"name\": \"restart\"}, \"status\": \"pending\"}}"
echo "restart result: $(wait_result demo-restart) (the agent's pid is $agent_pid)"
kill -0 "$agent_pid" && echo "the agent process $agent_pid is still the running agent"

say "changing a file FIM monitors in realtime (/etc/os-release of the demo host tree)"
printf 'PRETTY_NAME="changed by the demo"\n' >>"$work/host/etc/os-release"

sleep "$run_for"
"$agent" --config "$work/agent.toml" --status >"$work/status.json" || true
echo "status while running: $(cat "$work/status.json")"
kill -TERM "$agent_pid"
status=0
wait "$agent_pid" || status=$?
agent_pid=""
echo "agent stopped on SIGTERM with exit status $status"

say "what the agent logged"
sed 's/^/  /' "$work/agent.log"

say "what the server saw"
admin_get /admin/state >"$work/state.json"
auths=$(field auth_ok "$work/state.json")
echo "agents registered: $(grep -o '"id":"[^"]*"' "$work/state.json" | head -n 1 | cut -d'"' -f4)"
echo "successful authentications: $auths (1 at start + $((auths - 1)) token renewals before expiry)"
stateless=$(grep -o '"original":"Nov 26 15:00:0[0-2][^"]*"' "$work/state.json" | wc -l)
followed=$(grep -o '"original":"[^"]*logcollector"' "$work/state.json" | wc -l)
stateful=$(grep -o '"id":"\(6641e6\|0a1b2c\)","module":"inventory","operation":"[a-z]*"' "$work/state.json" | wc -l)
inventory=$(grep -o '"collector":"[a-z]*","id":"[0-9a-f]\{40\}","module":"inventory","operation":"create"' "$work/state.json" | wc -l)
echo "stateless events received: $stateless from --send, $followed from the followed file:"
grep -o '"original":"[^"]*"' "$work/state.json" | sed 's/^/  /'
echo "stateful events received from --send: $stateful"
grep -o '"id":"\(6641e6\|0a1b2c\)","module":"inventory","operation":"[a-z]*"' "$work/state.json" | sed 's/^/  /'
echo "inventory documents created by the scan of the demo host tree: $inventory"
grep -o '"collector":"[a-z]*","id":"[0-9a-f]\{40\}","module":"inventory","operation":"create"' "$work/state.json" | sed 's/^/  /'
fim=$(grep -o '"collector":"file","id":"[0-9a-f]\{40\}","module":"fim","operation":"[a-z]*"' "$work/state.json" | wc -l)
modified=$(grep -o '"reason":"File /etc/os-release was modified"' "$work/state.json" | wc -l)
echo "FIM documents (create, then update): $fim; notifications of the change: $modified"
grep -o '"collector":"file","id":"[0-9a-f]\{40\}","module":"fim","operation":"[a-z]*"' "$work/state.json" | sed 's/^/  /'
echo "requests: $(grep -o '"path":"/api/v1/events/[a-z]*","status":[0-9]*' "$work/state.json" | sort | uniq -c | tr -s ' ' | paste -sd ';' -)"
results=$(grep -o '"code":0,"id":"demo-[a-z-]*"' "$work/state.json" | wc -l)
if ! { [ "$status" -eq 0 ] && [ "$auths" -ge 2 ] && [ "$stateless" -eq 3 ] && [ "$followed" -eq 1 ] \
  && [ "$stateful" -eq 2 ] && [ "$results" -eq 2 ] && [ "$inventory" -eq 3 ] && [ "$fim" -eq 2 ] \
  && [ "$modified" -eq 1 ]; }; then
  echo "demo: FAILED" >&2
  exit 1
fi
echo
echo "demo OK"
