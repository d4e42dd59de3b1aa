#!/bin/bash
# Every GPU figure the open issues ask for, in one device call, in priority order; each phase's output goes to $OUT
# (the JSON of each `fewstep bench`, the text of every command, log.txt with the seconds at which each phase ended).
#
#   SHARED=DIR bash benchmarks/gpu_session.sh prepare   # here: fill .gpu/ (ignored by git; about 58 MB)
#   bash benchmarks/gpu_session.sh             # on the GPU machine, from the repository root, with .gpu/ beside it
#   SMALL=1 PY=python FEWSTEP_INCEPTION_WEIGHTS=... OUT=/tmp/out bash benchmarks/gpu_session.sh   # a CPU rehearsal
#
# .gpu/ holds what the GPU machine lacks: wheels (torch-fidelity, tomli-w, importlib-metadata), diffusers without its
# pipelines (xz tar: the AutoencoderKL is all fewstep uses), the 2015-12-05 FID Inception (TorchScript, fp16-rounded,
# xz) and the CIFAR-10 JPEG copy (train.tar.gz, test.tar.gz). The phases: the XL/2 recipe step (docs/imagenet.md),
# `fewstep bench` on DiT-B/2 latents (eager), FID(CIFAR-10 test, train) through `fewstep stats`, 1/2-NFE sampling
# with the SD-VAE decode and the Inception's images/s, cache-latents images/s with the full-size VAE, a shrunk
# U-Net SoFlow CIFAR-10 run, DiT-S/2 CIFAR pixels (eager), both compiled, the loop's CUDA-only tests; the quickstart
# on 2 pinned CPU cores runs beside them.
set -u
if [ "${1:-}" = prepare ]; then
  SHARED=${SHARED:?set SHARED to the folder holding data/cifar10/*.tar.gz and weights/inception-2015-12-05-fp16.torchscript.pt}
  mkdir -p .gpu/whl .gpu/cifar10
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .gpu/whl torch_fidelity==0.4.0 tomli_w importlib_metadata==8.7.0 jvp_flash_attention==0.14.0 diffusers==0.42.1 || exit 1
  d=$(mktemp -d); (cd "$d" && unzip -q "$OLDPWD"/.gpu/whl/diffusers-*.whl && rm -rf diffusers/pipelines/*/ \
    diffusers/modular_pipelines/*/ && tar cJf "$OLDPWD/.gpu/diffusers_trim.tar.xz" diffusers diffusers-*.dist-info)
  rm -f .gpu/whl/diffusers-*.whl "$d" -r
  xz -T2 -6 -c "$SHARED/weights/inception-2015-12-05-fp16.torchscript.pt" > .gpu/inception.pt.xz || exit 1
  cp "$SHARED"/data/cifar10/*.tar.gz .gpu/cifar10/ || exit 1
  du -sh .gpu; exit 0
fi
: "${OUT:=/tmp/gpu-out}"; mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
export COLUMNS=220
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SMALL=${SMALL:-0}
# PHASES: the phases to run (default all), e.g. PHASES="compiled loop" to finish a call that ran out of time
PHASES=" ${PHASES:-quickstart xl2 b2 stats sampling sampling_bf16 cache unet s2 compiled s2long cudagraphs long loop} "
# SIZES: which of the compiled and cudagraphs phases' two benches run (default "b2 s2")
SIZES=" ${SIZES:-b2 s2} "
# PROF: where the compiled and cudagraphs phases write their torch.profiler traces (`fewstep bench --profile`)
PROF=${PROF:-$OUT/prof}
# BUDGET: seconds after which no further phase starts (the call's limit minus the time to pack $OUT)
has() { case "$PHASES" in *" $1 "*) ;; *) return 1;; esac
  if [ $(( $(date +%s) - T0 )) -gt "${BUDGET:-100000}" ]; then log "skip $1 (budget)"; return 1; fi; return 0; }
PY=${PY:-python3}
if [ "$SMALL" = 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  tar xJf .gpu/diffusers_trim.tar.xz -C /tmp/site || exit 1
  export PYTHONPATH=/tmp/site
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
  xz -dc .gpu/inception.pt.xz > /tmp/inception.pt || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt"
  $PY -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/card.txt"
  git rev-parse HEAD >> "$OUT/card.txt" 2>/dev/null
fi
export FEWSTEP_INCEPTION_WEIGHTS=${FEWSTEP_INCEPTION_WEIGHTS:-/tmp/inception.pt}
F="$PY -m fewstep"
CIFAR=$PWD/.gpu/cifar10
BD=/tmp/bd; BDV=/tmp/bdv; BD512=/tmp/bd512
if [ "$SMALL" = 1 ]; then
  W="--steps 2 --warmup 1"; WL="--steps 3 --warmup 1"; NLAT512=16; B512="--batch 2 --set backbone.size=S/8"; JFA="--tokens 16 64 --batch 2 --heads 2 --dim 16 --dtype fp32 --iters 3"; XLB=2; B2="--batch 4 --set backbone.size=S/8"; S2="--batch 4"; NLAT=64; NCACHE=16; SB=8
  UNET="--set train.steps=4 --set train.batch=8 --set backbone.model_channels=16 --set backbone.num_blocks=1 --set eval.grid=10 --set eval.batch=10"
  XLSET="--set backbone.size=S/8"; QS=0; CACHE="--tiny --num 16 --workers 0 --device cpu"; STATN="--num 64"; FIDN="--fid-num 16"
else
  W="--steps 8 --warmup 15"; WL="--steps 40 --warmup 30"; NLAT512=1024; B512=""; JFA="--tokens 256 1024 --batch 64 --heads 12 --dim 64 --dtype bf16"; XLB=32; B2=""; S2=""; NLAT=4096; NCACHE=2048; SB=256
  UNET="--set train.steps=600 --set train.batch=128 --set train.log_every=100 --set eval.grid=100"
  XLSET=""; QS=1; CACHE="--num 1024 --workers 9 --batch 64"; STATN=""; FIDN=""
fi
# CPU side, in the background: the quickstart on 2 pinned cores (issue 22), and the benchmark data
if [ "$QS" = 1 ] && has quickstart; then
  ( CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c 14,15 /usr/bin/time -v $F train recipes/quickstart.toml --out /tmp/qs \
      --set train.device=cpu > "$OUT/quickstart.txt" 2>&1; cp /tmp/qs/*.json /tmp/qs/metrics.jsonl "$OUT/" 2>/dev/null
    mkdir -p "$OUT/qs"; cp -r /tmp/qs/samples "$OUT/qs/" 2>/dev/null ) &
fi
$PY benchmarks/make_bench_data.py --out $BD --cifar 0 --latents $NLAT > "$OUT/make_data.txt" 2>&1
log "bench data"
if has xl2; then
# 1. XL/2 recipe step (issue 16): per-GPU batch of the 8-GPU launch (256 / 8 = 32)
$F bench --recipe recipes/soflow_xl2.toml --set data.root=$BD/latents --objectives soflow --batch $XLB $W $XLSET \
  --no-train-step --json "$OUT/xl2.json" > "$OUT/xl2.txt" 2>&1; log "xl2 rc=$?"
fi
if has sampling || has sampling_bf16; then ( $PY benchmarks/make_bench_data.py --out $BDV --cifar 0 --latents $NLAT --vae-dir $BDV/vae > "$OUT/make_vae.txt" 2>&1 ) & VAEPID=$!; fi
if has b2; then
# 2. B/2 latents, eager (issue 17)
$F bench --recipe recipes/bench_latents_b2.toml --set data.root=$BD/latents $B2 $W --objectives fm,soflow,meanflow --json "$OUT/b2_eager.json" \
  > "$OUT/b2_eager.txt" 2>&1; log "b2 eager rc=$?"
fi
if has stats; then
# 3. FID(CIFAR-10 test, train) through the CLI and the stored-statistics path; Inception images/s (issue 14)
$F stats --data cifar10:$CIFAR --split train --out /tmp/cifar10-train.npz --batch 500 -O batch=500 $STATN > "$OUT/stats.txt" 2>&1
log "stats train rc=$?"
$F stats --data cifar10:$CIFAR --split test --out /tmp/cifar10-test.npz --batch 500 -O batch=500 $STATN --reference /tmp/cifar10-train.npz \
  >> "$OUT/stats.txt" 2>&1; log "stats test rc=$?"
mkdir -p runs/gpu; cp /tmp/cifar10-train.npz /tmp/cifar10-test.npz runs/gpu/ 2>/dev/null  # kept for back-to-back calls
fi
if has sampling; then
wait $VAEPID
# 5. sampling: XL/2 + SD-VAE decode, 1 and 2 NFE, and the Inception's images/s (issue 17.2)
$F bench --recipe recipes/bench_latents_xl2.toml --set data.root=$BDV/latents --set data.vae=$BDV/vae $XLSET --sampling \
  --objectives soflow --sample-batch $SB $FIDN --json "$OUT/sampling.json" > "$OUT/sampling.txt" 2>&1; log "sampling rc=$?"
fi
if has sampling_bf16; then
wait $VAEPID
# 5b. the same with the VAE decoder in bf16, 256 latents per VAE call (data.vae_dtype is fp32 in the paper recipes)
$F bench --recipe recipes/bench_latents_xl2.toml --set data.root=$BDV/latents --set data.vae=$BDV/vae $XLSET --sampling \
  --set data.vae_dtype=bf16 --set data.decode_batch=$SB --objectives soflow --sample-batch $SB $FIDN \
  --json "$OUT/sampling_bf16.json" > "$OUT/sampling_bf16.txt" 2>&1; log "sampling bf16 rc=$?"
fi
if has cache; then
# 6. cache-latents with the full-size VAE at 256 px (issue 14)
$PY benchmarks/cache_latents.py $CACHE > "$OUT/cache_latents.txt" 2>&1; log "cache rc=$?"
fi
if has unet; then
# 7. the U-Net SoFlow CIFAR-10 recipe, shrunk (issue 15): grid, step time, memory
$F train recipes/soflow_cifar10.toml --set data.root=$CIFAR $UNET --out /tmp/unet > "$OUT/unet.txt" 2>&1; log "unet rc=$?"
mkdir -p "$OUT/unet"; cp /tmp/unet/metrics.jsonl /tmp/unet/*.json "$OUT/unet/" 2>/dev/null; cp -r /tmp/unet/samples "$OUT/unet/" 2>/dev/null
fi
if has s2; then
# 4. S/2 CIFAR pixels, eager
$F bench --recipe recipes/bench_cifar_s2.toml --set data.root=$CIFAR $S2 $W --json "$OUT/s2_eager.json" \
  > "$OUT/s2_eager.txt" 2>&1; log "s2 eager rc=$?"
fi
if has compiled; then
# 8. compiled (issue 17.3)
case "$SIZES" in *" b2 "*)
$F bench --recipe recipes/bench_latents_b2.toml --set data.root=$BD/latents $B2 $W --compile --objectives fm,soflow,meanflow \
  --profile "$PROF/b2_compiled" --json "$OUT/b2_compiled.json" > "$OUT/b2_compiled.txt" 2>&1; log "b2 compiled rc=$?";; esac
case "$SIZES" in *" s2 "*)
$F bench --recipe recipes/bench_cifar_s2.toml --set data.root=$CIFAR $S2 $W --compile --objectives fm,soflow,meanflow \
  --profile "$PROF/s2_compiled" --json "$OUT/s2_compiled.json" > "$OUT/s2_compiled.txt" 2>&1; log "s2 compiled rc=$?";; esac
fi
if has s2long; then
# 8b. S/2 compiled again with 40 timed steps after 30: is the train / bare spread of 8 steps noise?
$F bench --recipe recipes/bench_cifar_s2.toml --set data.root=$CIFAR $S2 $WL --compile --objectives fm,soflow,meanflow \
  --json "$OUT/s2_compiled_long.json" > "$OUT/s2_compiled_long.txt" 2>&1; log "s2 compiled long rc=$?"
fi
if has cudagraphs; then
# 8c. S/2 and B/2 compiled with CUDA graphs (train.compile_mode = reduce-overhead): the launch gaps of small models
for r in bench_cifar_s2:$CIFAR bench_latents_b2:$BD/latents; do
  case "$SIZES" in *" $([ "${r%%:*}" = bench_cifar_s2 ] && echo s2 || echo b2) "*) ;; *) continue;; esac
  $F bench --recipe recipes/${r%%:*}.toml --set data.root=${r#*:} $([ "${r%%:*}" = bench_cifar_s2 ] && echo "$S2" || echo "$B2") $W \
    --compile --set train.compile_mode=reduce-overhead --objectives fm,soflow,meanflow \
    --profile "$PROF/${r%%:*}_cudagraphs" --json "$OUT/${r%%:*}_cudagraphs.json" > "$OUT/${r%%:*}_cudagraphs.txt" 2>&1; log "${r%%:*} cudagraphs rc=$?"
done
fi
if has long; then
# 9. long sequences (issue 17.5): DiT-B/2 on 512 px latents, 1024 tokens, batch 64; MeanFlow's JVP paths against FM
$PY benchmarks/make_bench_data.py --out $BD512 --cifar 0 --latents $NLAT512 --resolution 512 > "$OUT/make_512.txt" 2>&1
for mode in "" "--compile"; do
  $F bench --recipe recipes/bench_latents_b2_512.toml --set data.root=$BD512/latents $B512 $W $mode \
    --objectives fm,soflow,meanflow,meanflow:jvp_impl=torch --json "$OUT/b2_512${mode:+_compiled}.json" \
    > "$OUT/b2_512${mode:+_compiled}.txt" 2>&1; log "b2 512 ${mode:-eager} rc=$?"
done
# the attention tangent alone: closed form (the DiT's JVP today), torch.func.jvp, jvp_flash_attention (issue 17.5)
$PY benchmarks/jvp_flash_attn.py $JFA --json "$OUT/jvp_flash_attn.json" > "$OUT/jvp_flash_attn.txt" 2>&1
log "jvp flash attn rc=$?"
fi
if [ "$SMALL" = 0 ] && has loop; then  # the loop's CUDA-only checks (no host sync between log steps; data held on the GPU)
  timeout 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_loop_sync.py tests/test_bench.py -k "cuda or place" > "$OUT/loop_sync_gpu.txt" 2>&1
  log "loop_sync rc=$?"
fi
wait
log "done"
