#!/bin/bash
# The CIFAR-10 head-to-head driver (issue 20): train recipes/cifar10_*.toml runs side by side on one GPU, evaluate
# each at 1 and 2 NFE (flow matching also at its multi-step NFE), score the sanity pairs of real images with the
# same evaluator (CIFAR-10 test against train; the two halves of train), print one table and pack everything into
# $OUT/h2h.tgz.
#
# Cut at any moment, nothing done is lost: on SIGTERM (a call's time limit: `timeout -k 30 540 bash ...` signals
# the whole process group) the trainers write their checkpoints at the next step boundary, the driver waits for
# them, skips the evaluations it has not started, writes the table of what exists and exits 143; the next call
# resumes each run and evaluates only what is not current (an eval JSON is kept when its step, sample count and
# NFE match the run's latest checkpoint, and deleted before it is redone, so no table shows an older step's FID).
# Exit status: 0 all done, 143 stopped by SIGTERM (resumable), 1 a train or eval process failed.
#
#   CIFAR=/data/cifar10 REF=stats/cifar10-train.npz OUT=/tmp/out bash benchmarks/cifar10_h2h.sh \
#     soflow:recipes/cifar10_soflow.toml soflow_s1:recipes/cifar10_soflow.toml:1 \
#     meanflow:recipes/cifar10_meanflow.toml meanflow_s1:recipes/cifar10_meanflow.toml:1 \
#     imf:recipes/cifar10_imf.toml ect:recipes/cifar10_ect.toml sct:recipes/cifar10_sct.toml fm:recipes/cifar10_fm.toml \
#     fm025:recipes/cifar10_soflow_fm025.toml fm0:recipes/cifar10_soflow_fm0.toml \
#     mse:recipes/cifar10_soflow_mse.toml nocfg:recipes/cifar10_soflow_nocfg.toml
#
# Each RUN is NAME:RECIPE[:SEED[:STEPS]] and trains in $RUNS/NAME (`fewstep train RECIPE --out $RUNS/NAME
# --set data.root=$CIFAR --set train.steps=... --set train.seed=SEED`), its output in $RUNS/logs/NAME.train.txt.
# A run folder that already has a checkpoint is resumed (`--resume` with the folder's own recipe.toml), so a second
# GPU call with a larger STEPS continues the runs of the first (schedules tied to train.steps, SoFlow's r(k, K),
# then stretch from that step on). A finished run with nothing left to do is only re-evaluated.
#
# Environment:
#   CIFAR     data root (cifar-10-batches-py/, its .tar.gz, the JPEG train.tar.gz copy, or an image tree) [required]
#   REF       reference statistics .npz of the 50k training images; made here when the file is missing:
#             `fewstep stats --data cifar10:$CIFAR --split train --out $REF` (REF_NUM limits it, for rehearsals)
#   STEPS     train.steps of every run (default: the recipe's); the 4th field of a RUN overrides it for that run.
#             ECT's stage length (objective.double_every) is set to STEPS / 8 on a fresh run (its 8 official stages)
#   BUDGET_S  equal-time mode: train.max_seconds for every run (STEPS then caps the steps and sets the schedules:
#             give each run the steps it reaches in the budget, from the ms/step of an equal-steps call, as the 4th
#             field, and time with PAR=1: side by side, each run's speed depends on the others)
#   PAR       training processes side by side on the one GPU (default: the number of runs, at most 4)
#   NUM       generated samples per FID (default 10000); NFE (default 1,2); FM_NFE for flow matching
#             (default "1,2 8 32"): space-separated groups, one eval process and JSON each, so a long multi-step
#             evaluation that is cut costs only its own group
#   SANITY    "1" (default): FID(test, train) and FID(train half 2, train half 1) once, kept in $RUNS/sanity/
#   PREC      the network's arithmetic while sampling for FID: fp32 (default, as the official evaluations), tf32, bf16
#   EMA       EMA copies to evaluate, space-separated indices into train.ema (default: every copy of each run;
#             the base has [0.9999, 0.999])
#   RUNS      run folders (default runs/h2h); OUT: results (default $RUNS/out); PY (default python3)
#   SET       extra `--set` overrides for every fresh run, space-separated (CPU rehearsal: shrunk sizes)
#   EVAL_OPTS extra options of every `fewstep eval` and `fewstep stats` (CPU rehearsal without the Inception:
#             "-O feature_extractor=fewstep-pool48")
#   PHASES    "train eval table" (default all three; eval includes the sanity pairs)
# $OUT receives h2h.md, h2h.json and h2h.tgz (those two, every run's recipe.toml, metrics.jsonl, eval JSONs, final
# sample grids, and the logs): three files, whatever the number of runs.
set -u
if [ $# -lt 1 ]; then sed -n 2,48p "$0"; exit 2; fi
PY=${PY:-python3}
CIFAR=${CIFAR:?set CIFAR to the CIFAR-10 data root}
REF=${REF:?set REF to the reference statistics .npz (made when missing)}
RUNS=${RUNS:-runs/h2h}
OUT=${OUT:-$RUNS/out}
NUM=${NUM:-10000}
NFE=${NFE:-1,2}
FM_NFE=${FM_NFE:-1,2 8 32}
EMA=${EMA:-}
PREC=${PREC:-fp32}
PAR=${PAR:-$(( $# < 4 ? $# : 4 ))}
SANITY=${SANITY:-1}
EVAL_OPTS=${EVAL_OPTS:-}
STEPS=${STEPS:-}
BUDGET_S=${BUDGET_S:-}
SET=${SET:-}
PHASES=" ${PHASES:-train eval table} "
mkdir -p "$RUNS/logs" "$OUT"
LOG="$RUNS/logs/driver.txt"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
has() { case "$PHASES" in *" $1 "*) return 0;; esac; return 1; }
F="$PY -m fewstep"
STOP=0 FAILS=0
# a TERM to the driver alone is passed on to the training sessions (each passes it to its trainer)
trap 'STOP=1; log "SIGTERM: the trainers checkpoint, nothing new starts"; kill -TERM $(jobs -p) 2>/dev/null' TERM

# recipe facts: objective name and train.steps (the recipe resolved with its extends chain)
facts() { $PY - "$1" <<'EOF'
import sys
from fewstep.recipe import load_recipe
r = load_recipe(sys.argv[1])
print(r.objective.name, r.train["steps"])
EOF
}

declare -a NAMES=()
declare -A RECIPE=() SEED=() NSTEPS=()
for spec in "$@"; do
  IFS=: read -r name recipe seed steps <<< "$spec"
  if [ -z "$name" ] || [ -z "$recipe" ]; then echo "bad RUN '$spec': NAME:RECIPE[:SEED[:STEPS]]"; exit 2; fi
  if [ -n "${RECIPE[$name]:-}" ]; then echo "RUN name '$name' given twice"; exit 2; fi
  NAMES+=("$name"); RECIPE[$name]=$recipe; SEED[$name]=${seed:-}; NSTEPS[$name]=${steps:-$STEPS}
done

train_one() {  # NAME: train (fresh or resumed) in $RUNS/NAME; run it as `train_one NAME &`: it execs the trainer
  local name=$1 dir="$RUNS/$1" recipe=${RECIPE[$1]} seed=${SEED[$1]} steps=${NSTEPS[$1]}
  local -a args=(--out "$dir" --set "data.root=$CIFAR")
  [ -n "$steps" ] && args+=(--set "train.steps=$steps")
  [ -n "$BUDGET_S" ] && args+=(--set "train.max_seconds=$BUDGET_S")
  if [ -e "$dir/checkpoints/latest" ]; then
    # the folder's own resolved recipe: every override of the first call (seed, shrunk sizes, ECT stages) is in it
    exec $F train "$dir/recipe.toml" --resume "${args[@]}"
  else
    local obj rsteps
    local f; f=$(facts "$recipe") || return 1
    read -r obj rsteps <<< "$f"
    [ -n "$seed" ] && args+=(--set "train.seed=$seed")
    [ "$obj" = ect ] && args+=(--set "objective.double_every=$(( (${steps:-$rsteps} + 7) / 8 ))")
    for s in $SET; do args+=(--set "$s"); done
    [ -e "$dir" ] && args+=(--force)  # a folder without a checkpoint: a run that died before its first one
    exec $F train "$recipe" "${args[@]}"
  fi
}

ckpt_step() {  # the step of a run folder's latest checkpoint (0: none)
  local d=$1/checkpoints
  [ -e "$d/latest" ] || { echo 0; return; }
  sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$d/$(cat "$d/latest")/meta.json" 2>/dev/null | head -1 | grep . || echo 0
}

session() {  # NAME: one training session, recorded in $RUNS/NAME/h2h_sessions.jsonl (the table's source): first and
  # last step, the trainer's own ms/step (its clock starts after the build and the data set-up) and the process's seconds
  local name=$1 dir="$RUNS/$1" start end t0 t1 ms rc
  start=$(ckpt_step "$dir"); t0=$(date +%s.%N)
  train_one "$name" > "$RUNS/logs/$name.train.txt" 2>&1 &
  local child=$!
  # a TERM to this subshell (or the group) reaches the trainer, and the subshell stays until it has checkpointed
  trap 'kill -TERM $child 2>/dev/null' TERM
  wait $child; rc=$?
  while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
  t1=$(date +%s.%N); end=$(ckpt_step "$dir")
  ms=$(grep -a "ms / step" "$RUNS/logs/$name.train.txt" | tail -1 | grep -o "[0-9][0-9.]*" | head -1)
  [ -d "$dir" ] && echo "{\"start\": $start, \"end\": $end, \"ms_per_step\": ${ms:-null}, \"process_seconds\": $(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }"), \"rc\": $rc, \"budget_s\": \"$BUDGET_S\", \"gpu\": \"$GPU\"}" >> "$dir/h2h_sessions.jsonl"
  echo "$rc" > "$RUNS/logs/$name.train.rc"  # read back by the driver for its exit status
  echo "[$(( $(date +%s) - T0 ))s] trained $name steps $start -> $end rc=$rc" | tee -a "$LOG"
}

if has train; then
  export COLUMNS=200  # the trainer's summary table on one line per row (the ms / step row is read back)
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); GPU=${GPU:-cpu}
  log "train ${#NAMES[@]} runs, $PAR at a time: ${NAMES[*]}"
  for name in "${NAMES[@]}"; do
    while [ "$STOP" = 0 ] && [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do wait -n; done
    [ "$STOP" = 1 ] && break
    rm -f "$RUNS/logs/$name.train.rc"
    session "$name" &
  done
  while [ -n "$(jobs -rp)" ]; do wait; done  # a TERM returns `wait` early: wait again for the checkpoints
  for name in "${NAMES[@]}"; do  # 143 (a SIGTERM checkpoint) is a resumable stop, not a failure
    [ -f "$RUNS/logs/$name.train.rc" ] || continue  # not started (stopped first)
    case $(cat "$RUNS/logs/$name.train.rc") in 0|143) ;; *) FAILS=$((FAILS + 1)); log "train $name failed";; esac
  done
fi

fid_of() {  # the "fid(...) = X" line `fewstep stats --reference` prints -> X
  sed -n 's/^fid(.*) = \([0-9.]*\).*/\1/p' "$1" | tail -1
}

current() {  # JSON STEP NUM NFES: is this eval JSON of that step, sample count and NFE list?
  $PY - "$@" <<'PYEOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
ok = (d["step"] == int(sys.argv[2]) and d["protocol"]["num_samples"] == int(sys.argv[3])
      and sorted(r["nfe"] for r in d["results"]) == sorted(map(int, sys.argv[4].split(","))))
sys.exit(0 if ok else 1)
PYEOF
}

fids() {  # JSON -> "FID1 12.34, FID2 10.12"
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(', '.join(f\"FID{r['nfe']} {r['metrics'].get('fid', float('nan')):.2f}\" for r in d['results']))" "$1" 2>/dev/null
}

if has eval && [ "$STOP" = 0 ]; then
  if [ ! -f "$REF" ]; then
    log "reference statistics -> $REF"
    mkdir -p "$(dirname "$REF")"
    $F stats $EVAL_OPTS --data "cifar10:$CIFAR" --split train --out "$REF" ${REF_NUM:+--num $REF_NUM} > "$RUNS/logs/stats.txt" 2>&1 \
      || { log "stats failed: $(tail -3 "$RUNS/logs/stats.txt")"; exit 1; }
  fi
  if [ "$SANITY" = 1 ] && [ ! -f "$RUNS/sanity/sanity.json" ]; then
    # the same evaluator on real images only: CIFAR-10 test (10k) against the train statistics, and the second
    # half of train against the first (the images of one fixed order: `stats --num N` and `--num N --skip N`)
    S="$RUNS/sanity"; mkdir -p "$S"; half=$(( ${REF_NUM:-50000} / 2 ))
    $F stats $EVAL_OPTS --data "cifar10:$CIFAR" --split test --out "$S/test.npz" --reference "$REF" > "$S/test.txt" 2>&1 \
      && $F stats $EVAL_OPTS --data "cifar10:$CIFAR" --split train --num $half --out "$S/train_h1.npz" > "$S/h1.txt" 2>&1 \
      && $F stats $EVAL_OPTS --data "cifar10:$CIFAR" --split train --num $half --skip $half --out "$S/train_h2.npz" \
           --reference "$S/train_h1.npz" > "$S/h2.txt" 2>&1
    src=$?
    if [ $src = 0 ] && [ -n "$(fid_of "$S/test.txt")" ] && [ -n "$(fid_of "$S/h2.txt")" ]; then
      echo "{\"test_vs_train\": $(fid_of "$S/test.txt"), \"train_half2_vs_half1\": $(fid_of "$S/h2.txt"), \"half\": $half, \"reference\": \"$REF\"}" > "$S/sanity.json"
      log "sanity: $(cat "$S/sanity.json")"
    elif [ "$STOP" = 1 ]; then log "sanity stats: stopped"
    else
      FAILS=$((FAILS + 1)); log "sanity stats failed: $(tail -2 "$S"/*.txt | tr '\n' ' ')"
    fi
  fi
  for name in "${NAMES[@]}"; do
    [ "$STOP" = 1 ] && break
    dir="$RUNS/$name"
    if [ ! -e "$dir/checkpoints/latest" ]; then log "eval $name: no checkpoint, skipped"; continue; fi
    obj=$(sed -n '/^\[objective\]/,/^\[/s/^name = "\(.*\)"/\1/p' "$dir/recipe.toml" | head -1)
    groups=$NFE; [ "$obj" = fm ] && groups=$FM_NFE
    emas=$EMA
    [ -z "$emas" ] && emas=$($PY -c "import sys, tomllib; print(*range(len(tomllib.load(open(sys.argv[1], 'rb'))['train']['ema'])))" "$dir/recipe.toml")
    step=$(ckpt_step "$dir")
    for e in $emas; do
      for nfe in $groups; do
        [ "$STOP" = 1 ] && break 2
        j="$dir/eval_ema${e}_nfe${nfe//,/-}.json"
        if [ -f "$j" ] && current "$j" "$step" "$NUM" "$nfe"; then log "eval $name ema $e nfe $nfe: current (step $step), kept"; continue; fi
        rm -f "$j"  # a failed or cut evaluation must not leave an older step's FIDs in the table
        $F eval "$dir" $EVAL_OPTS --nfe "$nfe" --num "$NUM" --reference "$REF" --ema "$e" --precision "$PREC" --out "$j" \
          > "$RUNS/logs/$name.eval_ema${e}_nfe${nfe//,/-}.txt" 2>&1; erc=$?
        if [ $erc = 0 ]; then log "eval $name ema $e nfe $nfe step $step: $(fids "$j")"
        elif [ "$STOP" = 1 ]; then rm -f "$j"; log "eval $name ema $e nfe $nfe: stopped"
        else FAILS=$((FAILS + 1)); log "eval $name ema $e nfe $nfe step $step failed rc=$erc: $(tail -2 "$RUNS/logs/$name.eval_ema${e}_nfe${nfe//,/-}.txt")"; fi
      done
    done
  done
fi

if has table; then
  NUM=$NUM REF=$REF PAR=$PAR BUDGET_S=$BUDGET_S PREC=$PREC $PY - "$RUNS" "$OUT" "$EMA" "${NAMES[@]}" <<'EOF' | tee -a "$LOG"
import json, math, sys, tomllib
from pathlib import Path

runs, out, emas, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
rows, nfes = [], set()
for name in names:
    d = runs / name
    row = {"name": name, "run": str(d)}
    try:
        rec = tomllib.loads((d / "recipe.toml").read_text())
    except OSError:
        rows.append({**row, "status": "no run"}); continue
    row.update(recipe_name=rec.get("name"), objective=rec["objective"]["name"], seed=rec["train"]["seed"],
               steps_planned=rec["train"]["steps"], max_seconds=rec["train"].get("max_seconds", 0.0))
    led = [json.loads(l) for l in (d / "h2h_sessions.jsonl").read_text().splitlines() if l.strip()] \
        if (d / "h2h_sessions.jsonl").exists() else []
    ran = [x for x in led if x["end"] > x["start"]]
    # train seconds: the trainer's clock (ms/step x steps of each session); wall s: the processes, start-up included
    train_s = sum(x["ms_per_step"] * (x["end"] - x["start"]) / 1000 for x in ran if x["ms_per_step"] is not None)
    done = sum(x["end"] - x["start"] for x in ran if x["ms_per_step"] is not None)
    row.update(steps=max((x["end"] for x in led), default=0), train_seconds=round(train_s, 1),
               ms_per_step=round(1000 * train_s / done, 2) if done else None,
               wall_seconds=round(sum(x["process_seconds"] for x in ran), 1), sessions=led,
               gpu=sorted({x.get("gpu") for x in ran}))
    row["eval"] = {}
    for p in sorted(d.glob("eval_ema*_nfe*.json")):  # one file per EMA copy and NFE group
        e = p.name[len("eval_ema"):].split("_")[0]
        if emas and e not in emas:
            continue
        ev = json.loads(p.read_text())
        x = row["eval"].setdefault(e, {"steps": [], "weights": ev.get("protocol", {}).get("weights"),
                                       "num_samples": ev.get("protocol", {}).get("num_samples"), "fid": {}})
        x["steps"] = sorted(set(x["steps"]) | {ev.get("step")})
        x["fid"].update({str(r["nfe"]): r["metrics"].get("fid") for r in ev["results"]})
        nfes |= {int(r["nfe"]) for r in ev["results"]}
    rows.append(row)

nfes = sorted(nfes)
head = ["name", "objective", "seed", "steps", "train s", "ms/step", "wall s", "ema", "eval step"] + [f"FID {n}-NFE" for n in nfes]
fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.2f}" if isinstance(v, float) else str(v))
table = []
for r in rows:
    base = [r["name"], r.get("objective", "-"), r.get("seed", "-"), r.get("steps", "-"), r.get("train_seconds"), r.get("ms_per_step"),
            r.get("wall_seconds")]
    evs = r.get("eval") or {"-": {"fid": {}, "steps": []}}
    for e, ev in sorted(evs.items()):
        table.append(base + [e, "/".join(map(str, ev["steps"])) or "-"] + [ev["fid"].get(str(n)) for n in nfes])
import os
sanity = None
if (runs / "sanity" / "sanity.json").exists():
    sanity = json.loads((runs / "sanity" / "sanity.json").read_text())
    for label, key in (("CIFAR-10 test (10k) vs train", "test_vs_train"),
                       (f"train images {sanity['half']}-{2 * sanity['half'] - 1} vs 0-{sanity['half'] - 1}", "train_half2_vs_half1")):
        table.append([label, "real images", "-", "-", "-", "-", "-", "-", "-"] + [sanity[key]] + ["-"] * (len(nfes) - 1))
gpus = sorted({g for r in rows for g in r.get("gpu", []) if g})
md = [f"CIFAR-10 head-to-head: FID of {os.environ.get('NUM')} samples per NFE ({os.environ.get('PREC')} sampling) against "
      f"{os.environ.get('REF')} (the 50k training images of the data root given; the JPEG copy is not the paper's PNGs); "
      f"{os.environ.get('PAR')} training processes side by side on {', '.join(gpus) or '?'}"
      + (f"; equal time: train.max_seconds {os.environ['BUDGET_S']}" if os.environ.get("BUDGET_S") else "")
      + ". train s: the trainer's clock; wall s: the processes (start-up, grids, checkpoints included).", ""]
md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
md += ["| " + " | ".join(fmt(v) for v in t) + " |" for t in table]
(out / "h2h.md").write_text("\n".join(md) + "\n")
(out / "h2h.json").write_text(json.dumps({"nfe": nfes, "runs": rows, "sanity": sanity}, indent=1))
print("\n".join(md))
EOF
  # pack: tables, every run's recipe.toml / metrics.jsonl / eval JSONs / final sample grids, and the logs
  stage=$(mktemp -d); mkdir -p "$stage/h2h/logs"
  cp "$OUT/h2h.md" "$OUT/h2h.json" "$stage/h2h/"; cp "$RUNS"/logs/* "$stage/h2h/logs/" 2>/dev/null
  [ -d "$RUNS/sanity" ] && mkdir -p "$stage/h2h/sanity" && cp "$RUNS"/sanity/*.json "$RUNS"/sanity/*.txt "$stage/h2h/sanity/" 2>/dev/null
  for name in "${NAMES[@]}"; do
    d="$RUNS/$name"; s="$stage/h2h/runs/$name"; mkdir -p "$s"
    cp "$d"/recipe.toml "$d"/metrics.jsonl "$d"/h2h_sessions.jsonl "$d"/eval_ema*.json "$s/" 2>/dev/null
    last=$(ls "$d"/samples/step_*_nfe*.png 2>/dev/null | sed 's/.*step_\([0-9]*\)_.*/\1/' | sort | tail -1)
    [ -n "$last" ] && cp "$d"/samples/step_${last}_nfe*.png "$s/"
  done
  tar czf "$OUT/h2h.tgz" -C "$stage" h2h && rm -rf "$stage"
  echo "packed $OUT/h2h.tgz ($(du -h "$OUT/h2h.tgz" | cut -f1))"
fi
[ "$STOP" = 1 ] && { log "stopped by SIGTERM: run the same command again to continue"; exit 143; }
[ "$FAILS" = 0 ] || { log "$FAILS train/eval processes failed (their logs: $RUNS/logs)"; exit 1; }
exit 0
