#!/usr/bin/env bash
# Build containers/Dockerfile without a Docker daemon, with Charliecloud (ch-image), on Debian.
#
#   containers/build.sh                     # image "hvd-trainer" in ch-image's storage
#   containers/build.sh --tag NAME          # another name
#   containers/build.sh --no-cache          # ignore ch-image's build cache
#   containers/build.sh --if-changed        # skip the build when the image was built from exactly
#                                           # these files and arguments (what the tests use)
#   then: mpirun -np 2 -x USER --mca btl_vader_single_copy_mechanism none ch-run NAME -- hvd-train digits
#
# Steps:
# 1. The base image: Docker Hub may be unreachable, so a Debian bookworm root file system is made
#    with debootstrap from the mirror apt already uses, and imported as "hvd-base-bookworm"
#    (once; later builds reuse it).
# 2. A clean build context: the files git tracks or would track (no .venv, no runs/), without
#    tests/ and benchmarks/ (the image does not need them).
# 3. ch-image build --force (fakeroot for apt). The Dockerfile runs scripts/install.sh, as the
#    README does on a host. Mounted for the build only: the host's pip sources (local indexes and
#    find-links), its Horovod wheel cache ($HVD_TRAINER_CACHE/wheels: the image's key, python 3.11
#    + torch 2.13.0+cpu + Open MPI 4.1.4, is the host's, so no Horovod build) and its pip cache.
# Nothing is written into the repository. Prints timings on stderr and the image name on stdout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="hvd-trainer"
BASE="hvd-base-bookworm"
SUITE="bookworm"
CACHE_OPT=()
IF_CHANGED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --base) BASE="$2"; shift 2 ;;
    --no-cache) CACHE_OPT=(--no-cache); shift ;;
    --if-changed) IF_CHANGED=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf '[containers] %s\n' "$*" >&2; }
die() { printf '[containers] ERROR: %s\n' "$*" >&2; exit 1; }

export USER="${USER:-$(id -un)}"   # ch-image and ch-run stop with "$USER not set" otherwise
CACHE="${HVD_TRAINER_CACHE:-$HOME/.cache/hvd-trainer}"
# Debian's python: the python3 first on PATH may be another interpreter without lark.
CH=(/usr/bin/python3 /usr/bin/ch-image)
[ -x /usr/bin/ch-image ] || die "ch-image not found: apt-get install charliecloud-builders python3-lark (scripts/install.sh does)"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found: apt-get install debootstrap"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

# (list with --no-lock: a read; while another ch-image runs, a locked list fails and would read as
# "absent")
# --- 1. base image ----------------------------------------------------------------------------------
# (read the whole list first: under pipefail, grep -q leaving early makes the writer fail, and a
# present image would read as absent)
has_image() { local images; images="$("${CH[@]}" --no-lock list 2>/dev/null || true)"; grep -qx "$1" <<< "$images"; }
if has_image "$BASE"; then
  log "base image $BASE: present"
else
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  [ -n "$mirror" ] || mirror="$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  [ -n "$mirror" ] || die "no Debian mirror found in apt's sources"
  log "base image $BASE: debootstrap $SUITE from $mirror"
  rootfs="$tmp/rootfs"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" > "$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  # ch-image import copies device nodes as regular files: /dev/zero would fill the disk.
  rm -rf "${rootfs:?}"/dev/*
  "${CH[@]}" import "$rootfs" "$BASE" >&2
  rm -rf "$rootfs"
fi
t_base=$((SECONDS - t0))

# --- 2. build context -------------------------------------------------------------------------------
# A fixed path per tag, and the dependency layer's files dated by their content: ch-image keys a
# COPY on each source's path, size and mtime, so a fresh clone (new mtimes) of the same install
# script still finds that layer in the build cache, and any change to it misses.
ctx="$CACHE/containers/context/$TAG"
rm -rf "$ctx"
mkdir -p "$ctx"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) \
  | (cd "$REPO" && while IFS= read -r -d '' f; do
       case "$f" in tests/*|benchmarks/*) continue ;; esac  # not in the image: no rebuild for them
       [ -f "$f" ] && printf '%s\0' "$f"; done) \
  | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$ctx"
for f in setup.py scripts/install.sh scripts/horovod-wake-on-wait.patch; do
  touch -d "@$((16#$(sha256sum "$ctx/$f" | cut -c1-8)))" "$ctx/$f"
done

# --- 3. build -----------------------------------------------------------------------------------------
args=(build --force -t "$TAG" -f "$ctx/containers/Dockerfile" --build-arg "BASE_IMAGE=$BASE")
# the host's pip sources, e.g. find-links /opt/wheels and file:// indexes: same paths inside
pip_get() { /usr/bin/python3 -m pip config get "global.$1" 2>/dev/null || true; }
declare -A bound=()
for spec in "PIP_FIND_LINKS find-links" "PIP_EXTRA_INDEX_URL extra-index-url" "PIP_INDEX_URL index-url"; do
  read -r var key <<< "$spec"
  value="${!var:-$(pip_get "$key")}"
  [ -n "$value" ] || continue
  args+=(--build-arg "$var=$value")
  for item in $value; do
    path="${item#file://}"
    # a local index's pages link to ../../files: mount the index's parent
    if [ "$var" != PIP_FIND_LINKS ]; then path="$(dirname "$path")"; fi
    if [ "${path:0:1}" = / ] && [ -e "$path" ] && [ -z "${bound[$path]:-}" ]; then
      args+=(-b "$path"); bound[$path]=1
    fi
  done
done
# the CA bundle pip trusts here (a proxy's CA): mounted apart, not over the image's /etc/ssl
cert="${PIP_CERT:-$(pip_get cert)}"
if [ -n "$cert" ] && [ -f "$cert" ]; then
  args+=(-b "$(dirname "$cert"):/opt/hvd-build-cert" --build-arg "PIP_CERT=/opt/hvd-build-cert/$(basename "$cert")")
fi
mkdir -p "$CACHE/wheels"
args+=(-b "$CACHE/wheels:/var/cache/hvd-trainer/wheels")
if [ -d "$HOME/.cache/pip" ]; then args+=(-b "$HOME/.cache/pip:/root/.cache/pip"); fi
# what the image is made of: every file of the context and every argument
# (the context's temp path left out: it differs on every run)
recipe="$( (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum; printf '%s\n' "${args[@]//$ctx/CONTEXT}") \
  | sha256sum | cut -c1-32)"
stamp="$CACHE/containers/$TAG.recipe"
if [ "$IF_CHANGED" = 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$recipe" ] \
   && has_image "$TAG"; then
  log "$TAG is up to date (recipe $recipe)"
  echo "$TAG"
  exit 0
fi
log "ch-image ${args[*]} ${CACHE_OPT[*]} $ctx"
rm -f "$stamp"
# An image left half-written by a killed build makes every later build of its name fail
# ("can't mkdir: ...: File exists", found after a test run was killed mid-build): start from
# no image of this name (the build cache keeps the layers, so this costs no rebuild of them).
"${CH[@]}" delete "$TAG" >/dev/null 2>&1 || true
"${CH[@]}" "${CACHE_OPT[@]}" "${args[@]}" "$ctx" >&2
mkdir -p "$(dirname "$stamp")" && echo "$recipe" > "$stamp"
t_all=$((SECONDS - t0))
log "built $TAG in ${t_all}s (base image ${t_base}s)"
echo "$TAG"
