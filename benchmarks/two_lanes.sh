#!/usr/bin/env bash
# Two stage lists of h200_session.sh side by side on a 2-GPU machine (nvidia-h200-x2), one
# per GPU, so one device call does two calls' work; every output is tarred into ONE file
# (a device call brings back at most 8). Lane 1 starts after lane 0 has installed the wheels.
#   LANE0="steps online_r16" LANE1="http pairs" LIMIT=540 OUT=$OUT bash benchmarks/two_lanes.sh
# LIMIT: seconds after which both lanes are stopped (what they wrote still comes back).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/lane0 /tmp/lane1
( CUDA_VISIBLE_DEVICES=0 OUT=/tmp/lane0 STAGES="$LANE0" timeout ${LIMIT:-540} bash benchmarks/h200_session.sh > /tmp/lane0/lane.log 2>&1 ) &
sleep 20
( CUDA_VISIBLE_DEVICES=1 OUT=/tmp/lane1 STAGES="$LANE1" timeout ${LIMIT:-540} bash benchmarks/h200_session.sh > /tmp/lane1/lane.log 2>&1 ) &
wait
tail -n 60 /tmp/lane0/lane.log; echo; tail -n 60 /tmp/lane1/lane.log
tar czf $OUT/lanes.tgz -C /tmp lane0 lane1
