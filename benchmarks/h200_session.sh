#!/usr/bin/env bash
# Device calls on nvidia-h200 (1x H200, torch 2.11, triton 3.6) for the serving-regime
# engine and the twin. Each STAGE runs one command; outputs land in $OUT (one .txt per run,
# the last JSON line of each appended to results.jsonl). Wheels for what the box lacks
# (simpy, hydra-core, omegaconf, antlr4) travel in .whl/ (see benchmarks/README.md).
#   STAGES="smoke check steps offline" OUT=/tmp/out bash benchmarks/h200_session.sh
# KPLAN=<file>: the stages steps_small, offline, online16 and the calibrate stages run one
# skinny-GEMM plan (engine.kernel_plan: the first writes it, the others read it).
set -u
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { name=$1; t=$2; shift 2; echo "== $name: $*"; timeout $t "$@" > $OUT/$name.txt 2>&1; rc=$?; echo "rc=$rc";
        grep -v '^{' $OUT/$name.txt | grep -v -i 'loading\|warn' | tail -n ${TAIL:-14}; tail -n 1 $OUT/$name.txt >> $OUT/results.jsonl; return $rc; }
ckpt() { [ -f /tmp/$2/config.json ] || python3 -m engine.checkpoint $1 /tmp/$2 > /dev/null 2>&1; }
# the small step-cost table and the one-step kernel timeline of Qwen3-0.6B (A/B stages below)
SMALL_STEPS="python3 benchmarks/bench_serving.py --tables steps --model /tmp/twinserve-qwen3-0.6b --decode-batches 1,16,64 --mixed-batches 64 --chunks 16 ${KPLAN:+--kernel-plan $KPLAN}"
TIMELINE="python3 benchmarks/profile_decode.py --model /tmp/twinserve-qwen3-0.6b --top 30 --timeline 40"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
for stage in ${STAGES:-smoke check steps offline}; do case $stage in
  smoke)    run smoke 180 python3 benchmarks/bench_engine.py --smoke || exit 1 ;;
  check)    TAIL=40 run check_gpu 360 python3 benchmarks/check_gpu.py ;;
  steps)    ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=30 run steps_q06 300 python3 benchmarks/bench_serving.py --tables steps --model /tmp/twinserve-qwen3-0.6b ;;
  steps_eager) ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=30 run steps_q06_nograph 300 python3 benchmarks/bench_serving.py --tables steps --model /tmp/twinserve-qwen3-0.6b --graph-max-tokens 0 --chunks 16,512 --decode-batches 1,64 --mixed-batches 64 ;;
  profsteps) ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=60 run profile_steps_q06 240 python3 benchmarks/bench_serving.py --tables steps --model /tmp/twinserve-qwen3-0.6b --decode-batches 64 --mixed-batches 64 --chunks 16,2048 --steps 6 --profile 64:0,64:16,64:2048 ;;
  offline)  ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=30 run engine_q06 240 python3 benchmarks/bench_engine.py --model /tmp/twinserve-qwen3-0.6b --steps-csv $OUT/steps_q06.csv ${KPLAN:+--kernel-plan $KPLAN} ;;
  online)   TAIL=12 run online 580 python3 benchmarks/bench_serving.py --tables online --out /tmp/online ;;
  online16) TAIL=12 run online_q06_r16 300 python3 benchmarks/bench_serving.py --tables online --online "qwen3-0.6b@16" --out /tmp/online ${KPLAN:+--override engine.kernel_plan=$KPLAN}
            for f in steps.parquet requests.parquet summary.json; do cp /tmp/online/qwen3-0.6b-r16/$f $OUT/r16_$f; done ;;
  online_l8) TAIL=12 run online_l8 400 python3 benchmarks/bench_serving.py --tables online --online "llama-3.1-8b@8" --out /tmp/online ;;
  online_old) # the previous engine (commit 9352870, carried as old/) on the same replay, side by side
            (cd old && PYTHONPATH=/tmp/site:$PWD TAIL=40 run online_old_r${RATE:-16} 300 python3 run.py mode=gpu trace=sharegpt trace.num_requests=400 trace.request_rate=${RATE:-16} hardware=h200 logger=none hydra.run.dir=/tmp/old_r${RATE:-16}) ;;
  kernels)  TAIL=12 run kernels_gpu 300 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fusion.py ;;   # (MoE, W4A16: check_moe, quant)
  launches) TAIL=40 run launches_q06 240 python3 benchmarks/bench_gemm.py --stages launches --engine qwen3-0.6b ;;
  online_q06|online_r16) # the three loads; their run folders (steps and requests: twin checks) tarred
            TAIL=12 run online_q06 400 python3 benchmarks/bench_serving.py --tables online --online "qwen3-0.6b@8,16,32" --out /tmp/online
            tar czf $OUT/online_runs.tgz -C /tmp/online . ;;
  calibrate) # TWINSERVE_COMMIT: the tree here is a copy without git (experiments/calibrate.py);
            # a copy in /tmp/calib for later calls on this machine (the tree is re-copied each call)
            TAIL=40 run calibrate_q06 300 python3 run.py experiment=calibrate model=qwen3-0.6b hardware=h200 ${KPLAN:+engine.kernel_plan=$KPLAN}
            mkdir -p /tmp/calib && cp simulator/calibrations/qwen3-0.6b-h200-tp1.* /tmp/calib/
            tar czf $OUT/calibrations.tgz simulator/calibrations ;;
  calibrate_l8)
            TAIL=40 run calibrate_l8 ${CAL_T:-560} python3 run.py experiment=calibrate model=llama-3.1-8b hardware=h200 ${KPLAN:+engine.kernel_plan=$KPLAN}
            mkdir -p /tmp/calib && cp simulator/calibrations/llama-3.1-8b-h200-tp1.* /tmp/calib/
            tar czf $OUT/calibrations_l8.tgz simulator/calibrations/llama-3.1-8b-h200-tp1.* ;;
  calibrate_l8_tp2) # Llama-3.1-8B at TP=2: both GPUs of nvidia-h200-x2, so never inside a lane
            TAIL=40 run calibrate_l8_tp2 ${CAL_T:-560} python3 run.py experiment=calibrate model=llama-3.1-8b hardware=h200 engine.tensor_parallel_size=2 ${KPLAN:+engine.kernel_plan=$KPLAN}
            tar czf $OUT/calibrations_l8_tp2.tgz simulator/calibrations/llama-3.1-8b-h200-tp2.* ;;
  fidelity) # the real cells of the fidelity table (capacity from the fitted twin, then the
            # engine runs); the sim and table stages run on any CPU from the tarball
            TAIL=30 run fidelity ${FID_T:-540} python3 benchmarks/fidelity/run_fidelity.py --model ${FID_MODEL:-qwen3-0.6b} \
                --hardware h200 --calibration ${CAL:-/tmp/calib/qwen3-0.6b-h200-tp1.json} --out /tmp/fid \
                --num-requests ${NREQ:-200} --repeats ${REPEATS:-2} --loads ${LOADS:-0.3,0.6,0.9,1.2} \
                --pairs ${PAIRS:-policy,budget,prefix_caching,block_size} --stages capacity,real
            tar czf $OUT/fidelity.tgz -C /tmp fid ;;
  fid_real) # real cells of the fidelity table straight into $OUT/fid_<model> (a lane stopped
            # by its time limit still brings back every finished run); knobs: FID_MODEL CAL
            # TRACES LOADS NREQ REPEATS PAIRS FID_T
            m=${FID_MODEL:-qwen3-0.6b}
            TAIL=30 run fid_real_$m ${FID_T:-540} python3 benchmarks/fidelity/run_fidelity.py --model $m \
                --hardware h200 --calibration ${CAL:-simulator/calibrations/$m-h200-tp1.json} --out $OUT/fid_$m \
                --traces ${TRACES:-sharegpt,azure_conv,mooncake_conv} --num-requests ${NREQ:-100} \
                --repeats ${REPEATS:-3} --loads ${LOADS:-0.3,0.6,0.9,1.2} --pairs "${PAIRS-policy,budget,block_size,prefix_caching}" \
                --stages capacity,real ;;
  fid_mc)   # mooncake_conv's cells (shared prefixes) at the loads of the table's L0-L2, plus the
            # prefix-caching pair, on this engine and its fresh calibration (the shared-KV feature);
            # the table's capacity file, so the pair runs at L2 as in the table
            mkdir -p /tmp/fid_mc && cp benchmarks/fidelity/results/qwen3-0.6b-h200/capacity.json /tmp/fid_mc/
            TAIL=20 run fidelity_mooncake ${FID_T:-400} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b \
                --hardware h200 --calibration ${CAL:-/tmp/calib/qwen3-0.6b-h200-tp1.json} --out /tmp/fid_mc \
                --traces mooncake_conv --rates 6.2,12.39,18.59 --num-requests ${NREQ:-200} --repeats ${REPEATS:-2} \
                --pairs prefix_caching --stages real
            tar czf $OUT/fid_mc.tgz -C /tmp fid_mc ;;
  pairs)    # the fidelity table's policy-effect pairs, both sides on this engine, at the load of
            # the table's L2 cells (0.9 x the capacity call 2's fitted twin found)
            TAIL=20 run pairs_sharegpt ${FID_T:-400} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b \
                --hardware h200 --calibration ${CAL:-simulator/calibrations/qwen3-0.6b-h200-tp1.json} --out /tmp/pairs_sg \
                --traces sharegpt --rates 17.68 --num-requests ${NREQ:-200} --repeats ${REPEATS:-2} \
                --pairs policy,budget,block_size --stages real
            TAIL=20 run pairs_mooncake ${FID_T:-300} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b \
                --hardware h200 --calibration ${CAL:-simulator/calibrations/qwen3-0.6b-h200-tp1.json} --out /tmp/pairs_mc \
                --traces mooncake_conv --rates 18.59 --num-requests ${NREQ:-200} --repeats ${REPEATS:-2} \
                --pairs prefix_caching,policy --stages real
            tar czf $OUT/pairs.tgz -C /tmp pairs_sg pairs_mc ;;
  http)     STAGES="http offline sim" NREQ=${NREQ:-100} RATES="${RATES:-6 12 24}" BUDGET=${BUDGET:-200} OUT=$OUT bash benchmarks/h200_http.sh ;;
  check_tp) TAIL=20 run check_tp 420 python3 benchmarks/check_tp.py --tp 2 ;;
  transitions) # a step after a different step vs after itself (Llama-3.1-8B, its calibration's kernel plan)
            ckpt llama-3.1-8b twinserve-llama-3.1-8b
            TAIL=40 run transitions_l8 240 python3 benchmarks/probe_transitions.py --model /tmp/twinserve-llama-3.1-8b \
                --kernel-plan ${KPLAN:-simulator/calibrations/llama-3.1-8b-h200-tp1.json} --decodes ${TD:-8,32,128} --chunk ${TC:-128,512,2048} ;;
  transitions_more) # the KV block layout (scattered as profiled vs in order) and the clock under a burst of prompt steps
            ckpt llama-3.1-8b twinserve-llama-3.1-8b
            TAIL=40 run transitions_more_l8 300 python3 benchmarks/probe_transitions.py --model /tmp/twinserve-llama-3.1-8b \
                --kernel-plan ${KPLAN:-simulator/calibrations/llama-3.1-8b-h200-tp1.json} --stages layout,recovery \
                --decodes ${TD:-8,32,128} --chunk ${TC:-2048} --context ${TCTX:-3072} ;;
  transitions_q06) ckpt qwen3-0.6b twinserve-qwen3-0.6b
            TAIL=40 run transitions_q06 200 python3 benchmarks/probe_transitions.py --model /tmp/twinserve-qwen3-0.6b \
                --kernel-plan simulator/calibrations/qwen3-0.6b-h200-tp1.json --decodes ${TD:-8,32,128} --chunk ${TC:-128,512,2048} ;;
  blocksize) # attention speed by block size 1-256 -> the H200 hardware yaml and the calibration's
            TAIL=30 run h200_attention_blocks 150 python3 benchmarks/bench_attention.py --stages blocks \
                --write-hardware conf/hardware/h200.yaml --write-hardware simulator/calibrations/qwen3-0.6b-h200-tp1.hardware.yaml
            tar czf $OUT/blocksize_yaml.tgz conf/hardware/h200.yaml simulator/calibrations/qwen3-0.6b-h200-tp1.hardware.yaml ;;
  gemm)     TAIL=40 run bench_gemm 200 python3 benchmarks/bench_gemm.py ;;
  gemm_engine) TAIL=30 run bench_gemm_engine 240 python3 benchmarks/bench_gemm.py --stages engine --engine qwen3-0.6b ;;
  check_moe) TAIL=30 run check_moe_gpu 300 python3 benchmarks/check_moe_gpu.py ;;
  attn_sweep) TAIL=40 run attention_sweep 200 python3 benchmarks/bench_attention.py --stages decode --sweep --no-flashinfer ;;
  overlap)  TAIL=12 run attention_overlap 120 python3 benchmarks/bench_attention.py --stages overlap --no-flashinfer ;;   # a mixed step's two attention kernels on two streams
  quant)    # issue 13 in one stage list: h200_quant.sh (engine_q, then kernels) within QBUDGET s
            STAGES="engine_q kernels" BUDGET=${QBUDGET:-520} OUT=$OUT bash benchmarks/h200_quant.sh ;;
  prof_small) # one decode step's kernels in launch order, batch 1 and 64 (where the fixed cost goes)
            ckpt qwen3-0.6b twinserve-qwen3-0.6b
            for b in 1 64; do TAIL=70 run profile_q06_b$b 200 $TIMELINE --batch $b; done ;;
  b1host)  # issue 9's host half: a cProfile of batch-1 decoding, and StepPacker.pack on this host's CPU
            ckpt qwen3-0.6b twinserve-qwen3-0.6b
            TAIL=60 run b1_cprofile_q06 240 python3 benchmarks/bench_engine.py --model /tmp/twinserve-qwen3-0.6b \
                --num-seqs 1 --max-input-len 512 --max-output-len 1024 --decode-batches 1 --cprofile 45
            TAIL=8 run bench_pack 120 python3 benchmarks/bench_pack.py ;;
  steps_small) ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=12 run steps_small 200 $SMALL_STEPS ;;
  streams)  # EngineConfig.attention_streams A/B on mixed steps (one engine each, the same kernel plan)
            ckpt qwen3-0.6b twinserve-qwen3-0.6b
            MIXED="python3 benchmarks/bench_serving.py --tables steps --model /tmp/twinserve-qwen3-0.6b --decode-batches 64 --mixed-batches 64,256 --chunks 16,128,512,2048 ${KPLAN:+--kernel-plan $KPLAN}"
            TAIL=14 run steps_mixed_one_stream 200 $MIXED; TAIL=14 run steps_mixed_streams 200 $MIXED --attention-streams ;;
  steps_nopdl) ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=12 run steps_small_nopdl 200 $SMALL_STEPS --pdl-max-tokens 0 ;;
  prof_nopdl) ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=70 run profile_q06_b1_nopdl 200 $TIMELINE --batch 1 --pdl-max-tokens 0 ;;
  offline_nopdl) ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=30 run engine_q06_nopdl 240 python3 benchmarks/bench_engine.py --model /tmp/twinserve-qwen3-0.6b --pdl-max-tokens 0 ;;
  old_prof) # the same on the engine carried as old/ (another commit), side by side
            ckpt qwen3-0.6b twinserve-qwen3-0.6b
            (cd old && PYTHONPATH=/tmp/site:$PWD; export PYTHONPATH
             for b in 1 64; do TAIL=70 run old_profile_q06_b$b 200 $TIMELINE --batch $b; done
             TAIL=12 run old_steps_small 200 $SMALL_STEPS) ;;
  carried)  # a stage list of another tree (a helper's branch) carried as the folder $CARRIED, e.g. CARRIED=moe15 CSTAGES=moe_full
            (cd ${CARRIED} && OUT=$OUT STAGES="${CSTAGES}" bash benchmarks/h200_session.sh) ;;
  moe_bench) TAIL=30 run bench_moe_l16 400 python3 benchmarks/bench_moe.py --num-layers 16 ;;
  prof)     ckpt qwen3-0.6b twinserve-qwen3-0.6b; TAIL=24 run profile_q06_b${BATCH:-256} 240 python3 benchmarks/profile_decode.py --model /tmp/twinserve-qwen3-0.6b --batch ${BATCH:-256} ;;
  # Issue 15 on the whole Qwen3-30B-A3B (48 layers, 61 GB bf16): weights drawn on each GPU at
  # load (engine.checkpoint --draw-at-load, /tmp/twinserve-qwen3-30b-a3b-drawn: no disk). On
  # nvidia-h200-x2: the lanes, then moe_tp2 (both GPUs, so never inside a lane), e.g. as two calls
  #   TWINSERVE_COMMIT=<sha> LANE0="fid_moe" LANE1="moe_full calibrate_moe" LIMIT=500 OUT=$OUT bash benchmarks/two_lanes.sh
  #   STAGES=moe_tp2 OUT=$OUT bash benchmarks/h200_session.sh
  moe_full) # (a) one H200: nano-vLLM workload, decode B=1/64/256 vs floor, MoE layer, tiles, routing
            TAIL=48 run bench_moe_full 420 python3 benchmarks/bench_moe.py ;;
  moe_tp2)  # (b) TP=2: every expert's intermediate dim split over the 2 GPUs
            TAIL=30 run bench_moe_tp2 420 python3 benchmarks/bench_moe.py --tensor-parallel-size 2 ;;
  calibrate_moe) # (c) the twin's MoE calibration (experts_touched, the MoE grid); TWINSERVE_COMMIT as in calibrate
            q30=/tmp/twinserve-qwen3-30b-a3b-drawn
            [ -f $q30/config.json ] || python3 -m engine.checkpoint qwen3-30b-a3b $q30 --draw-at-load > /dev/null 2>&1
            TAIL=40 run calibrate_moe 420 python3 run.py experiment=calibrate model=qwen3-30b-a3b hardware=h200 engine.model_path=$q30
            tar czf $OUT/calibration_moe.tgz simulator/calibrations/qwen3-30b-a3b-h200-tp1.* ;;
  fid_moe)  # (c) the fidelity table's MoE row, real cells: sharegpt, 100 requests, 2 repeats, at
            # 0.3/0.6/0.9 x 5.88 req/s (the H200 roofline twin's capacity at 100 requests, on a CPU:
            # independent of calibrate_moe, so the two lanes run side by side); sim + table on a CPU
            q30=/tmp/twinserve-qwen3-30b-a3b-drawn
            [ -f $q30/config.json ] || python3 -m engine.checkpoint qwen3-30b-a3b $q30 --draw-at-load > /dev/null 2>&1
            TAIL=20 run fidelity_moe ${FID_T:-420} python3 benchmarks/fidelity/run_fidelity.py --model qwen3-30b-a3b \
                --hardware h200 --calibration simulator/calibrations/qwen3-30b-a3b-h200-tp1.json --out /tmp/fid_moe \
                --traces sharegpt --rates ${MOE_RATES:-1.764,3.528,5.292} --num-requests ${NREQ:-100} --repeats ${REPEATS:-2} \
                --pairs "" --stages real --set engine.model_path=$q30
            tar czf $OUT/fid_moe.tgz -C /tmp fid_moe ;;
esac; done
