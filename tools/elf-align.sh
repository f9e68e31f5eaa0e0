#!/bin/sh
# Checks that every LOAD segment of each ELF shared object is aligned to 16 KB or a
# multiple of it: what Android 15+ devices with 16 KB pages need, and what Google Play
# requires of apps that target them (linked with -z max-page-size=16384, the NDK's
# default from r28). Prints each file's alignments.
#
#   tools/elf-align.sh LIB.so...      (READELF=... picks the readelf; any ELF machine)
set -eu
readelf=${READELF:-readelf}
[ $# -gt 0 ] || { echo "usage: tools/elf-align.sh LIB.so..." >&2; exit 2; }
status=0
for lib in "$@"; do
  # `readelf -lW`: one line per program header; a LOAD line's last field is its Align.
  aligns=$("$readelf" -lW "$lib" | awk '$1 == "LOAD" { print $NF }')
  [ -n "$aligns" ] || { echo "elf-align: $lib has no LOAD segments (not a shared object?)" >&2; status=1; continue; }
  bad=""
  for a in $aligns; do
    if [ $(( a % 16384 )) -ne 0 ] || [ $(( a )) -eq 0 ]; then
      bad="$bad $a"
    fi
  done
  if [ -n "$bad" ]; then
    echo "elf-align: $lib: LOAD segments aligned to$bad, under 16 KB (link with -Wl,-z,max-page-size=16384)" >&2
    status=1
  else
    echo "elf-align: $(basename "$lib"): LOAD aligned to" $aligns
  fi
done
exit $status
