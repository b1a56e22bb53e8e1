#!/usr/bin/env bash
# Proxy benchmark runs (../shared/docs/proxy.md): the real English text of ../shared/corpus in the
# challenge's shard format, train_gpt.py on one GPU. Run from anywhere inside the repository.
#
# Here, on the developer machine (once per clone; ../shared must sit beside the repository):
#   bash tools/proxy_run.sh prepare
#       copy the corpus halves, tools and tokenizers of ../shared into the git-ignored .proxy/
#       (.proxy/a, .proxy/b, .proxy/tools, .proxy/tokenizers); add /.proxy/ to .git/info/exclude
# On the GPU machine (each call carrying the .proxy folders that it reads):
#   bash tools/proxy_run.sh unpack DIR...       copy carried corpus parts into /root/corpus
#   bash tools/proxy_run.sh shards VARIANT      tokenize /root/corpus into /root/shards_VARIANT
#                                               (sp1024, sp8192 or caseops: CaseOps sp8192 with its byte
#                                               sidecar, tools/caseops_prep.py; needs .proxy/tools, .proxy/tokenizers)
#   bash tools/proxy_run.sh start NAME VARIANT [VAR=VALUE ...]
#       copy train_gpt.py to /root/runs/NAME and start it detached on /root/shards_VARIANT
#       (OUT_DIR=/root/runs/NAME/out, SEED=42 and PROFILE=1gpu unless set; stdout in /root/runs/NAME/stdout.log;
#       SHIPPED=1: run the shipped form that tools/ship.py writes instead of the source;
#       KEEP_PREQUANT=1: through tools/keep_prequant.py, for tools/quant_sweep.py in that folder)
#   bash tools/proxy_run.sh eval NAME ARTIFACT [VAR=VALUE ...]
#       the same with EVAL_ONLY=ARTIFACT: score an artifact, no training (VARIANT=caseops unless set)
#   bash tools/proxy_run.sh wait SECONDS [NAME ...]
#       wait up to SECONDS while a run is alive, print each run's progress, and copy its stdout,
#       log, results json and submission.json (the .ptz artifact too with KEEP_ARTIFACT=1) into
#       $OUT as NAME.FILE; a device call brings back 8 files, so past 8 the logs and json beyond the
#       seventh go into $OUT/more.tar (write nothing else into $OUT)
# Environment: SHARED (default: ../shared beside the repository), PROXY_ROOT (default: /root).
# A run started detached dies with the machine: keep a `wait` running until it has ended.
set -euo pipefail
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PR=${PROXY_ROOT:-/root}
RUN_PATTERN='[p]ython3 (train_gpt|keep_prequant)[.]py'   # the brackets keep the pattern from matching its own command line
MAX_FILES=8
MAX_FILE_BYTES=$((16 * 1024 * 1024))

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 2; }
die() { echo "proxy_run.sh: $*" >&2; exit 1; }

check_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "NAME must be letters, digits, '.', '_', '-': $1"
}
check_variant() {
  [[ $1 =~ ^sp[0-9]+$ || $1 == caseops ]] || die "VARIANT must be caseops or look like sp1024 or sp8192: $1"
}
# the variant's tokenizer file name and vocabulary size
tokenizer_of() { if [[ $1 == caseops ]]; then echo fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model; else echo "fineweb_${1#sp}_bpe.model"; fi; }
vocab_of() { if [[ $1 == caseops ]]; then echo 8192; else echo "${1#sp}"; fi; }
check_assignments() {
  local a
  for a in "$@"; do
    [[ $a =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "not a VAR=VALUE setting: $a"
  done
}

# Is a train_gpt.py process running in folder $1?
run_alive() {
  local p want
  want=$(cd "$1" && pwd -P) || return 1
  for p in $(pgrep -f "$RUN_PATTERN" || true); do
    [[ $(readlink "/proc/$p/cwd" 2>/dev/null) == "$want" ]] && return 0
  done
  return 1
}

prepare() {
  local shared=${SHARED:-$ROOT/../shared} excl f
  [[ -d $shared/corpus && -d $shared/tools && -d $shared/tokenizers ]] \
    || die "no corpus/, tools/ and tokenizers/ in $shared (set SHARED=path/to/shared)"
  cd "$ROOT"
  excl=$(git rev-parse --git-path info/exclude 2>/dev/null) || die "$ROOT is not a git checkout"
  mkdir -p "$(dirname "$excl")"
  if ! grep -qxF '/.proxy/' "$excl" 2>/dev/null; then
    if [[ -s $excl && -n $(tail -c 1 "$excl") ]]; then echo >>"$excl"; fi
    echo '/.proxy/' >>"$excl"
    echo "added /.proxy/ to $excl"
  fi
  git check-ignore -q .proxy/a/x || die ".proxy/ is still not ignored by git (see $excl)"
  mkdir -p .proxy/a .proxy/b
  for f in train_000.txt.xz train_001.txt.xz train_002.txt.xz train_003.txt.xz val.txt.xz; do
    [[ -f $shared/corpus/$f ]] || die "missing $shared/corpus/$f"
  done
  cp -f "$shared/corpus/train_000.txt.xz" "$shared/corpus/train_001.txt.xz" .proxy/a/
  cp -f "$shared/corpus/train_002.txt.xz" "$shared/corpus/train_003.txt.xz" "$shared/corpus/val.txt.xz" .proxy/b/
  rm -rf .proxy/tools .proxy/tokenizers
  cp -r "$shared/tools" "$shared/tokenizers" .proxy/
  chmod -R u+w .proxy
  du -sh .proxy/a .proxy/b .proxy/tools .proxy/tokenizers
}

unpack() {
  local d
  [[ $# -ge 1 ]] || usage
  mkdir -p "$PR/corpus"
  for d in "$@"; do
    compgen -G "$d/*.txt.xz" >/dev/null || die "no *.txt.xz in $d (carry it with the call)"
    cp -f "$d"/*.txt.xz "$PR/corpus/"
  done
  ls -la "$PR/corpus"
}

shards() {
  local v=$1 tok out tmp
  check_variant "$v"
  out=$PR/shards_$v
  tok=$ROOT/.proxy/tokenizers/$(tokenizer_of "$v")
  [[ -f $tok ]] || die "no $tok (carry .proxy/tokenizers)"
  [[ -f $ROOT/.proxy/tools/make_shards.py ]] || die "no .proxy/tools/make_shards.py (carry .proxy/tools)"
  mkdir -p "$PR/tokenizers"
  cp -f "$tok" "$PR/tokenizers/"   # the runs read it from here, whatever a later call carries
  if [[ -f $out/fineweb_val_000000.bin ]]; then echo "$out exists"; return 0; fi
  [[ -f $PR/corpus/val.txt.xz ]] || die "no $PR/corpus/val.txt.xz (unpack .proxy/b first)"
  echo "corpus: $(cd "$PR/corpus" && echo train_*.txt.xz) val.txt.xz"
  tmp=$out.partial
  rm -rf "$tmp"
  if [[ $v == caseops ]]; then  # the case transform, the tokens and the validation byte sidecar
    python3 "$ROOT/tools/caseops_prep.py" --corpus "$PR/corpus" --tokenizer "$tok" --out "$tmp" --workers "$(nproc)"
  else
    python3 "$ROOT/.proxy/tools/make_shards.py" --corpus "$PR/corpus" --tokenizer "$tok" \
      --out "$tmp" --workers "$(nproc)"
  fi
  mv "$tmp" "$out"
}

# start_run NAME VARIANT [VAR=VALUE ...]
start_run() {
  local name=$1 v=$2 n d tok
  shift 2
  check_name "$name"
  check_variant "$v"
  check_assignments "$@"
  n=$(vocab_of "$v") d=$PR/runs/$name
  tok=$PR/tokenizers/$(tokenizer_of "$v")
  [[ -f $PR/shards_$v/fineweb_val_000000.bin ]] || die "no shards in $PR/shards_$v (run: shards $v)"
  [[ -f $tok ]] || die "no $tok (run: shards $v)"
  [[ -e $d ]] && die "$d exists: choose another NAME"
  mkdir -p "$d"
  if [[ ${SHIPPED:-0} == 1 ]]; then  # the file that ships: the compressed self-extracting form
    (cd "$ROOT" && python3 tools/ship.py "$d/train_gpt.py")
  else
    cp "$ROOT/train_gpt.py" "$d/"
  fi
  local driver=train_gpt.py
  if [[ ${KEEP_PREQUANT:-0} == 1 ]]; then  # also keep the float weights + Hessians for tools/quant_sweep.py
    [[ ${SHIPPED:-0} == 1 ]] && die "KEEP_PREQUANT=1 patches the source form: leave SHIPPED unset"
    cp "$ROOT/tools/keep_prequant.py" "$d/"
    driver=keep_prequant.py
  fi
  local -a cmd=(env -u OUT "DATA_PATH=$PR/shards_$v" "TOKENIZER_PATH=$tok" "VOCAB_SIZE=$n" "SEED=${SEED:-42}" "PROFILE=1gpu"
                "OUT_DIR=$d/out" "DATA_NAME=proxy corpus (../shared/corpus), ${v/caseops/CaseOps sp8192} shards" "$@"
                python3 "$driver")
  printf '%q ' "${cmd[@]}" >"$d/command.txt"
  echo >>"$d/command.txt"
  # detached with no descriptor of ours: bash keeps a copy of the caller's stdout on a high fd,
  # and a run holding it kept `start ... | tail` waiting until the run had ended
  (
    cd "$d" || exit 1
    for fd in /proc/$BASHPID/fd/*; do fd=${fd##*/}; if ((fd > 2)); then eval "exec $fd>&-"; fi; done
    setsid nohup "${cmd[@]}" >"$d/stdout.log" 2>&1 </dev/null &
  )
  echo "started $name in $d: $(cat "$d/command.txt")"
  sleep 5
  if ! run_alive "$d"; then
    echo "proxy_run.sh: $name ended at once; its output:" >&2
    tail -n 20 "$d/stdout.log" >&2
    exit 1
  fi
}

eval_run() {
  local name=$1 art=$2
  shift 2
  [[ -f $art ]] || die "no artifact at $art"
  art=$(cd "$(dirname "$art")" && pwd)/$(basename "$art")
  start_run "$name" "${VARIANT:-caseops}" "EVAL_ONLY=$art" "$@"
}

# flat_name PATH: RUN.FILE for a run's stdout.log or out/FILE
flat_name() {
  local d=${1%/stdout.log}
  d=${d%/out/*}
  echo "$(basename "$d").$(basename "$1")"
}

# copy_out SRC NAME.FILE: copy into $OUT under a flat, safe name, at most MAX_FILES files
copied=0
copy_out() {
  local src=$1 dst=${2//[^A-Za-z0-9._-]/_} size
  [[ -f $src ]] || return 0
  size=$(stat -c %s "$src")
  if (( size > MAX_FILE_BYTES )); then echo "  not copied (over 16 MiB): $src"; return 0; fi
  if (( copied >= MAX_FILES )); then echo "  not copied (no slot left of the $MAX_FILES a call brings back): $src"; return 0; fi
  cp "$src" "$OUT/$dst"
  copied=$((copied + 1))
  echo "  -> \$OUT/$dst"
}

wait_runs() {
  local secs=$1 end now d name f
  [[ $secs =~ ^[0-9]+$ ]] || die "SECONDS must be a whole number: $secs"
  shift
  local -a dirs=()
  if [[ $# -gt 0 ]]; then
    for name in "$@"; do check_name "$name"; [[ -d $PR/runs/$name ]] || die "no run $PR/runs/$name"; dirs+=("$PR/runs/$name"); done
  else
    for d in "$PR"/runs/*/; do [[ -d $d ]] && dirs+=("${d%/}"); done
  fi
  [[ ${#dirs[@]} -gt 0 ]] || { echo "no runs in $PR/runs"; return 0; }
  end=$(( $(date +%s) + secs ))
  while :; do
    local alive=0
    for d in "${dirs[@]}"; do run_alive "$d" && alive=1; done
    now=$(date +%s)
    (( alive && now < end )) || break
    sleep $(( end - now < 5 ? end - now : 5 ))
  done
  for d in "${dirs[@]}"; do
    name=$(basename "$d")
    if run_alive "$d"; then echo "== $name: running"; else echo "== $name: ended"; fi
    [[ -f $d/stdout.log ]] || continue
    grep -E '^(step:|late QAT|training done|rate control|artifact:|wall clock|prequant|final_|ttt phase|evaluation:|quantization gap)|[Ee]rror|NOT compliant|refus|[Ww]arning' \
      "$d/stdout.log" | tail -n 14 || true
    if ! run_alive "$d" && ! grep -q '^evaluation:' "$d/stdout.log"; then
      echo "  (no evaluation line; last lines:)"; tail -n 3 "$d/stdout.log"
    fi
  done
  [[ -n ${OUT:-} && -d ${OUT:-} ]] || return 0
  local -a files=()
  for d in "${dirs[@]}"; do files+=("$d/stdout.log"); done
  if [[ ${KEEP_ARTIFACT:-0} == 1 ]]; then for d in "${dirs[@]}"; do files+=("$d"/out/*.ptz); done; fi
  for d in "${dirs[@]}"; do files+=("$d"/out/results_*.json "$d/out/submission.json"); done
  for d in "${dirs[@]}"; do files+=("$d"/out/train_*.log "$d"/out/eval_*.log); done
  # a .ptz (up to 16 MiB) travels alone; past the limit, the logs and json that find no slot go
  # together into $OUT/more.tar, which takes the last slot
  local -a ptz=() small=() rest=()
  for f in "${files[@]}"; do
    [[ -f $f ]] || continue
    if [[ $f == *.ptz ]]; then ptz+=("$f"); else small+=("$f"); fi
  done
  local slots=$MAX_FILES
  (( ${#ptz[@]} + ${#small[@]} > MAX_FILES && ${#small[@]} > 0 )) && slots=$((MAX_FILES - 1))
  for f in ${ptz[@]+"${ptz[@]}"} ${small[@]+"${small[@]}"}; do
    if (( copied < slots )); then
      copy_out "$f" "$(flat_name "$f")"
    elif [[ $f == *.ptz ]]; then
      echo "  not copied (no slot left of the $MAX_FILES a call brings back): $f"
    else
      rest+=("$f")
    fi
  done
  [[ ${#rest[@]} -gt 0 ]] || return 0
  local pack
  pack=$(mktemp -d)
  for f in "${rest[@]}"; do cp "$f" "$pack/$(flat_name "$f")"; done
  tar -C "$pack" -cf "$pack.tar" .
  if (( $(stat -c %s "$pack.tar") > MAX_FILE_BYTES )); then
    echo "  not copied (over 16 MiB): more.tar of ${#rest[@]} files"
  else
    mv "$pack.tar" "$OUT/more.tar"
    echo "  -> \$OUT/more.tar (${#rest[@]} files: tar -xf more.tar)"
  fi
  rm -rf "$pack" "$pack.tar"
}

verb=${1:-}
[[ $# -gt 0 ]] && shift
case "$verb" in
  prepare) [[ $# -eq 0 ]] || usage; prepare ;;
  unpack) unpack "$@" ;;
  shards) [[ $# -eq 1 ]] || usage; shards "$1" ;;
  start) [[ $# -ge 2 ]] || usage; start_run "$@" ;;
  eval) [[ $# -ge 2 ]] || usage; eval_run "$@" ;;
  wait) [[ $# -ge 1 ]] || usage; wait_runs "$@" ;;
  *) usage ;;
esac
