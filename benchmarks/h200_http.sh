#!/usr/bin/env bash
# Issue 11 on one H200, in one device call (about 5 minutes with the defaults): the cost of
# the HTTP layer and the twin over HTTP. The same ShareGPT trace (NREQ requests, Poisson at
# each of RATES req/s, qwen3-0.6b random weights, bf16, defaults of the engine) runs
#   offline  python run.py mode=gpu                        (the engine in-process, wall clock)
#   http     python -m server + python -m bench            (the same engine behind HTTP, in
#            its own process; stage http_inproc: --engine-in-process, not run by default;
#            at XCHECK_RATES, default the highest rate, also measured by the httpx client)
#   sim      python -m server --backend sim + python -m bench (the twin: the fitted H200
#            calibration, CAL=none for the roofline; paced)
#   simoff   python run.py mode=sim                        (the twin offline, for reference)
# then benchmarks/compare_http.py prints the table, the split of each HTTP run's mean TTFT
# (client and transport / the server's prepare, engine, handoff, write: its twinserve:
# histograms) and HTTP's cost as (engine - offline) + server HTTP path + client, and one
# JSON line. Needs wheels the box
# lacks in .whl/ (fastapi starlette pydantic pydantic-core uvicorn annotated-types
# typing-inspection, plus hydra's: see benchmarks/README.md "HTTP"), carried with the call.
#   STAGES="http offline sim" NREQ=100 RATES="6 12 24" OUT=$OUT bash benchmarks/h200_http.sh
# A stage that would start after BUDGET seconds (default 360) is skipped, saying so. The
# twin's stage needs no GPU: on the GPU host it runs last, on the host's idle cores, against
# the GPU runs just made (in $RUNS); on a CPU-only box `STAGES=sim RUNS=<those runs>` reruns
# it alone (its own runs are replaced, the GPU runs kept).
# The http stage prints the server's stall log after each rate (python -m server: kernels
# compiled after the engine's warm-up, named, and the run's slowest steps with their shapes).
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # this tree's packages, for every script
if ls .whl/*.whl >/dev/null 2>&1; then
  [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-/tmp/out}; RUNS=${RUNS:-/tmp/runs}; mkdir -p $OUT $RUNS
NREQ=${NREQ:-100}; RATES=${RATES:-"6 12 24"}; CK=/tmp/q06; PORT=${PORT:-8000}
XCHECK_RATES=${XCHECK_RATES-${RATES##* }}   # rates also measured by the httpx client ("" = none)
# the twin: the shipped H200 calibration of this model (CAL= to choose another, CAL=none: roofline)
CAL=${CAL:-simulator/calibrations/qwen3-0.6b-h200-tp1.json}; SIMCOST=""; SERVECOST=""
if [ "$CAL" != none ]; then SIMCOST="cost_model=fitted cost_model.path=$CAL"; SERVECOST="--cost-model fitted --calibration $CAL"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
case " ${STAGES:-http offline sim} " in *" offline "*|*" http"*)   # the engine's stages only
  [ -f $CK/config.json ] || python3 -m engine.checkpoint qwen3-0.6b $CK ;; esac
RUN="trace=sharegpt trace.num_requests=$NREQ model=qwen3-0.6b hardware=h200 logger=none progress=false"
BENCH="python3 -m bench --url http://127.0.0.1:$PORT --trace sharegpt --num-prompts $NREQ \
  --vocab-size 151936 --set max_total_len=8192 --num-warmups 4 --reset-prefix-cache --disable-tqdm"
# --reset-prefix-cache: every rate starts from an empty prefix cache, as run.py's replays do
# (they reset the engine after the warm-up); without it the rates after the first found the
# whole trace cached (same prompts) and their TPOT read 17-21 % below the offline replay's.
mark=0     # lines of the server's log already shown
stalls() { # the server's stall log since the last call (printed at a prefix-cache reset)
  python3 -c "import httpx; httpx.post('http://127.0.0.1:$PORT/reset_prefix_cache', timeout=60)" 2>/dev/null
  sleep 1; local log=$OUT/server_$stage.log
  tail -n +$((mark + 1)) $log | grep -E "^stalls|^  compiled|^  slow step" | sed 's/^/   /'; mark=$(wc -l < $log); }
serve() {   # start a server in the background; wait for /health
  python3 -m server --port $PORT --disable-uvicorn-access-log --uvicorn-log-level warning "$@" > $OUT/server_$stage.log 2>&1 &
  SERVER=$!
  for i in $(seq 600); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { tail -20 $OUT/server_$stage.log; return 1; }; sleep 0.5
  done; return 1; }
stop() {    # stop the server; wait until it and its engine process hold no GPU memory
  kill $SERVER; for i in $(seq 60); do kill -0 $SERVER 2>/dev/null || break; sleep 0.5; done
  kill -9 $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
  for i in $(seq 60); do [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break; sleep 0.5; done; }
for stage in ${STAGES:-http offline sim}; do
  if [ $SECONDS -gt ${BUDGET:-360} ]; then echo "== $stage skipped: ${SECONDS} s spent (BUDGET ${BUDGET:-360})"; continue; fi
  start=$(date +%s); echo "== $stage"; case $stage in
  offline) for r in $RATES; do
             timeout 200 python3 run.py mode=gpu $RUN engine.model_path=$CK trace.request_rate=$r \
               hydra.run.dir=$RUNS/offline_$r 2>&1 | grep -E "Successful|Mean TTFT|Mean TPOT|results:"; done ;;
  http|http_inproc)
           flag=""; [ $stage = http_inproc ] && flag=--engine-in-process
           mark=0; serve --model $CK --served-model-name qwen3-0.6b $flag && { grep -h "skinny GEMM\|^stalls" $OUT/server_$stage.log; mark=$(wc -l < $OUT/server_$stage.log); } &&
           for r in $RATES; do
             timeout 200 $BENCH --request-rate $r --out $RUNS/${stage}_$r 2>&1 | grep -E "Successful|Mean TTFT|Mean TPOT|^mean TTFT|failed"
             stalls
           done
           [ $stage = http ] && for r in $XCHECK_RATES; do
             timeout 200 $BENCH --request-rate $r --http-client httpx --out $RUNS/http_httpx_$r 2>&1 | grep -E "^mean TTFT|failed"
             stalls
           done; stop ;;
  sim)     for r in $RATES; do python3 run.py mode=sim $RUN trace.request_rate=$r $SIMCOST hydra.run.dir=$RUNS/simoff_$r > /dev/null 2>&1; done
           serve --backend sim --model qwen3-0.6b --hardware h200 $SERVECOST && for r in $RATES; do
             timeout 200 $BENCH --request-rate $r --out $RUNS/sim_$r 2>&1 | grep -E "Successful|Mean TTFT|Mean TPOT|^mean TTFT|failed"
           done && for r in $XCHECK_RATES; do
             timeout 200 $BENCH --request-rate $r --http-client httpx --out $RUNS/sim_httpx_$r 2>&1 | grep -E "^mean TTFT|failed"
           done; stop ;;
esac; echo "   $stage: $(( $(date +%s) - start )) s"; done
tar czf $OUT/h200_http_runs.tar.gz -C $RUNS . 2>/dev/null
python3 benchmarks/compare_http.py $RUNS | tee $OUT/h200_http.txt
