#!/usr/bin/env bash
# Runs a command in a fresh memory cgroup capped at LIMIT bytes (cgroup v1
# memory.limit_in_bytes, or v2 memory.max), as root. Prints the cgroup's peak usage
# and whether the kernel's OOM killer struck, and exits with the command's status.
#   tools/memcap.sh 805306368 sdrs generate -m sd15-q4_0.gguf ...
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 LIMIT_BYTES COMMAND..." >&2; exit 2; }
limit=$1; shift
if [ -d /sys/fs/cgroup/memory ]; then
    cg=/sys/fs/cgroup/memory/sdrs-memcap-$$
    mkdir "$cg"
    echo "$limit" > "$cg/memory.limit_in_bytes"
    # No swapping around the cap where swap accounting exists.
    echo "$limit" > "$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
    peak_file=memory.max_usage_in_bytes
elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg=/sys/fs/cgroup/sdrs-memcap-$$
    mkdir "$cg"
    echo "$limit" > "$cg/memory.max"
    echo 0 > "$cg/memory.swap.max" 2>/dev/null || true
    peak_file=memory.peak
else
    echo "$0: no memory cgroup controller on this machine" >&2
    exit 2
fi
set +e
bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' memcap "$cg" "$@"
rc=$?
set -e
peak=$(cat "$cg/$peak_file" 2>/dev/null || echo "?")
oom=$( (grep -h "^oom_kill " "$cg/memory.oom_control" "$cg/memory.events" 2>/dev/null || true) | awk "{print \$2}" | head -1)
echo "memcap: limit $limit bytes, cgroup peak $peak bytes, oom kills ${oom:-0}, exit $rc" >&2
rmdir "$cg" 2>/dev/null || true
exit $rc
