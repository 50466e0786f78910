#!/bin/sh
# Reserve COUNT 2 MiB hugepages on NUMA node NODE and check the kernel granted them.
# usage: hugepages.sh NODE COUNT
set -eu
[ $# -eq 2 ] || { echo "usage: $0 NODE COUNT" >&2; exit 2; }
node=$1 count=$2
f=/sys/devices/system/node/node$node/hugepages/hugepages-2048kB/nr_hugepages
[ -w "$f" ] || { echo "$f: not writable (no node $node, or not root)" >&2; exit 1; }
echo "$count" > "$f"
got=$(cat "$f")
if [ "$got" -lt "$count" ]; then
  echo "asked for $count 2 MiB pages on node $node, the kernel granted $got (memory fragmented: reserve at boot)" >&2
  exit 1
fi
echo "node $node: $got x 2 MiB hugepages reserved"
