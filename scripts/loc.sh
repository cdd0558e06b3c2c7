#!/bin/sh
# Lines of the agent core: every file under src/, up to its `#[cfg(test)]` module (unit
# tests sit at the end of each file and are not counted). One line per file, then the total.
set -eu
cd "$(dirname "$0")/.."
find src -name '*.rs' | sort | while read -r f; do
    awk '/^#\[cfg\(test\)\]/ { exit } { n++ } END { printf "%6d %s\n", n, FILENAME }' "$f"
done | sort -n | awk '{ s += $1; print } END { printf "%6d total (agent core, without unit tests)\n", s }'
