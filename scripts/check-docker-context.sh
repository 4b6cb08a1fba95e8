#!/usr/bin/env bash
# Proves, without a Docker daemon, that the Dockerfile's build stage compiles: replays its COPY
# lines from the build context into a directory of their own and runs `cargo check --locked`
# there, once as the dependency step sees it (the files copied before the first `cargo build`,
# plus the empty src/main.rs and src/lib.rs that step makes) and once as the final build does.
# COPY lines of the other stages (but --from) must name files of the context.
#
# The context is what a clean clone holds (files git tracks, or new files it does not ignore)
# less what .dockerignore excludes. The copies keep their files' times and stay, between runs,
# in a temporary directory named after this checkout; each step's compiler is a wrapper of its
# own (RUSTC_WORKSPACE_WRAPPER), which gives mantlegate's artifacts of that step names of their
# own in the target directory. So the steps share the target directory's dependencies with
# `cargo clippy`, never mantlegate's own artifacts (the repository's, the other step's), and a
# run without changes finds mantlegate checked already. Only the Dockerfile syntax mantlegate
# uses is read: COPY in shell form without globs, WORKDIR, FROM, RUN; anything else in a COPY
# fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dockerfile=${1:-Dockerfile}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
work=${TMPDIR:-/tmp}/mantlegate-docker-context-$(printf %s "$repo" | sha256sum | cut -c1-12)

fail() {
  echo "error: $dockerfile: $*" >&2
  exit 1
}

# .dockerignore patterns, without a leading / or ./ (Docker anchors them at the context root).
ignore=()
if [ -f .dockerignore ]; then
  while IFS= read -r p || [ -n "$p" ]; do
    p=${p%%#*}
    p=${p%"${p##*[![:space:]]}"}
    [ -z "$p" ] && continue
    [[ $p == '!'* ]] && fail ".dockerignore exceptions (!$p) are not read by this check"
    p=${p#./}
    p=${p#/}
    ignore+=("${p%/}")
  done <.dockerignore
fi
ignored() {
  local p
  for p in "${ignore[@]}"; do
    # shellcheck disable=SC2053 # the pattern is a glob on purpose
    [[ $1 == $p || $1 == $p/* ]] && return 0
  done
  return 1
}

# The build context, one path a line.
context=$(mktemp)
trap 'rm -f "$context"' EXIT
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files --cached --others --exclude-standard
else
  find . -type f -printf '%P\n'
fi | while IFS= read -r f; do
  [ -f "$f" ] && ! ignored "$f" && printf '%s\n' "$f"
done | sort -u >"$context"

# The instructions, continuation lines joined, comments and blank lines dropped.
mapfile -t instructions < <(
  sed -e '/^[[:space:]]*#/d' "$dockerfile" |
    awk '{ if (sub(/\\[[:space:]]*$/, "")) { line = line $0 " "; next } print line $0; line = "" }' |
    sed -e '/^[[:space:]]*$/d'
)

# Copies SRC (a context file or directory) to DEST (absolute in the image) under ROOT, as
# Docker's COPY does: a directory's contents into DEST, a file into DEST/ or as DEST.
copy_into() {
  local root=$1 src=${2#./} dest=$3 into_dir=$4 f rel
  src=${src%/}
  [ "$src" = . ] && src=
  if [ -n "$src" ] && grep -qxF -- "$src" "$context"; then
    if [ "$into_dir" = 1 ]; then
      mkdir -p "$root$dest"
      cp -p "$src" "$root$dest/$(basename "$src")"
    else
      mkdir -p "$(dirname "$root$dest")"
      cp -p "$src" "$root$dest"
    fi
    return
  fi
  local found=0
  while IFS= read -r f; do
    if [ -z "$src" ]; then rel=$f; elif [[ $f == "$src"/* ]]; then rel=${f#"$src"/}; else continue; fi
    mkdir -p "$(dirname "$root$dest/$rel")"
    cp -p "$f" "$root$dest/$rel"
    found=1
  done <"$context"
  [ "$found" = 1 ] || fail "COPY $2: not in the build context (not in a clean clone, or excluded by .dockerignore)"
}

# The build stage's COPY lines, each "WORKDIR<tab>DEST<tab>SRC...".
copies=()
# Replays the first N of them into a new ROOT.
replay() {
  local root=$1 n=$2 i workdir dest srcs src into_dir
  rm -rf "$root"
  mkdir -p "$root"
  for ((i = 0; i < n; i++)); do
    IFS=$'\t' read -r workdir dest srcs <<<"${copies[i]}"
    read -r -a srcs <<<"$srcs"
    [[ $dest == /* ]] || dest=$workdir/$dest
    into_dir=0
    [[ $dest == */ || ${#srcs[@]} -gt 1 ]] && into_dir=1
    dest=${dest%/}
    dest=${dest//\/.\//\/}
    dest=${dest%/.}
    for src in "${srcs[@]}"; do
      copy_into "$root" "$src" "$dest" "$into_dir"
    done
  done
}

stage=-1
build_stage=
workdir=/
dep_copies=
dep_run=
dep_workdir=
final_copies=
final_workdir=
others=()
for line in "${instructions[@]}"; do
  read -r keyword rest <<<"$line"
  case ${keyword^^} in
  FROM)
    stage=$((stage + 1))
    workdir=/
    ;;
  WORKDIR)
    if [[ $rest == /* ]]; then workdir=$rest; else workdir=$workdir/$rest; fi
    ;;
  COPY | ADD)
    [[ ${keyword^^} == ADD ]] && fail "ADD is not read by this check; use COPY"
    read -r -a args <<<"$rest"
    from=0
    while [[ ${args[0]:-} == --* ]]; do
      [[ ${args[0]} == --from=* ]] && from=1
      [[ ${args[0]} == --parents* ]] && fail "COPY --parents is not read by this check"
      args=("${args[@]:1}")
    done
    [ "$from" = 1 ] && continue
    [[ ${args[0]:-} == '['* || $rest == *'"'* || $rest == *"'"* ]] &&
      fail "COPY $rest: only the shell form without quotes is read by this check"
    [[ $rest == *[*?]* ]] && fail "COPY $rest: globs are not read by this check"
    [ ${#args[@]} -ge 2 ] || fail "COPY $rest: a source and a destination are needed"
    if [ -z "$build_stage" ] || [ "$build_stage" = "$stage" ]; then
      copies+=("$workdir"$'\t'"${args[-1]}"$'\t'"${args[*]:0:${#args[@]}-1}")
    else
      others+=("${args[@]:0:${#args[@]}-1}")
    fi
    ;;
  RUN)
    if [[ $rest == *"cargo build"* ]]; then
      if [ -z "$build_stage" ]; then
        build_stage=$stage
        dep_copies=${#copies[@]}
        dep_run=$rest
        dep_workdir=$workdir
      fi
      final_copies=${#copies[@]}
      final_workdir=$workdir
    fi
    ;;
  esac
  # COPY lines of stages before the build stage are not replayed.
  if [[ ${keyword^^} == FROM && -z $build_stage ]]; then
    copies=()
  fi
done
[ -n "$build_stage" ] || fail "no RUN line runs cargo build"

for src in "${others[@]}"; do
  src=${src#./}
  src=${src%/}
  grep -qxF -- "$src" "$context" || grep -q -- "^$src/" "$context" ||
    fail "COPY $src: not in the build context (not in a clean clone, or excluded by .dockerignore)"
done

export CARGO_TARGET_DIR=$target_dir
# `cargo check --locked` in DIR with the compiler wrapper of STEP.
check() {
  local step=$1 dir=$2 wrapper=$work/rustc-$1
  printf '#!/bin/sh\nexec "$@"\n' >"$wrapper"
  chmod +x "$wrapper"
  (cd "$dir" && RUSTC_WORKSPACE_WRAPPER=$wrapper cargo check --locked --quiet) ||
    fail "the $step step of the image's build does not compile from what the Dockerfile copies"
}
if [ "$dep_copies" != "$final_copies" ]; then
  echo "dependency step: $dep_copies COPY lines replayed, then cargo check"
  replay "$work/deps" "$dep_copies"
  # The stand-ins that step writes before it builds.
  mkdir -p "$work/deps$dep_workdir/src"
  if [[ $dep_run == *src/main.rs* ]]; then
    echo 'fn main() {}' >"$work/deps$dep_workdir/src/main.rs"
  fi
  if [[ $dep_run == *src/lib.rs* ]]; then
    : >"$work/deps$dep_workdir/src/lib.rs"
  fi
  check dependency "$work/deps$dep_workdir"
fi
echo "final build: $final_copies COPY lines replayed, then cargo check"
replay "$work/final" "$final_copies"
check final "$work/final$final_workdir"
echo "the Dockerfile's build context compiles"
