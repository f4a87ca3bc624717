#!/usr/bin/env bash
# Lists the processes still running in (or below) the directory given, other than this script
# and its ancestors: what a CI run left behind. Exits 1 when there are any.
set -uo pipefail
root=$(cd "${1:?usage: leftovers.sh DIR}" && pwd -P)
declare -A mine=()
pid=$$
while [ "$pid" -gt 1 ]; do  # this script and everything above it
    mine[$pid]=1
    pid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || echo 1)
done
found=0
for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ -n "${mine[$pid]:-}" ] && continue
    cwd=$(readlink "$dir/cwd" 2>/dev/null) || continue
    case "$cwd" in
        "$root"|"$root"/*)
            state=$(awk '{print $3}' "$dir/stat" 2>/dev/null)
            [ "$state" = Z ] && continue
            [ "$(readlink "$dir/exe" 2>/dev/null)" = "$(readlink /proc/$$/exe)" ] \
                && [ "$(tr '\0' ' ' < "$dir/cmdline")" = "$(tr '\0' ' ' < /proc/$$/cmdline)" ] \
                && continue  # a subshell of this script
            echo "left behind: pid $pid ($(tr '\0' ' ' < "$dir/cmdline" | cut -c1-200))"
            found=1 ;;
    esac
done
exit "$found"
