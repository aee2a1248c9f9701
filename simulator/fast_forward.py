"""Event skipping for the simulator's step loop: when the next steps are plain decode steps
(policy.fast_forward), cost them one after another, keep those that end before the next
arrival, and apply them to the scheduler at once. The result is the step-by-step loop's,
to the last bit of every timestamp (tests/test_fast_forward.py runs both).

Used only where nothing outside the replica can observe the steps in between: one
replica (a router would see another replica's state mid-stretch) and a stateless cost
model (a replayed run is consumed step by step, and a step costed but not taken would
shift it).
"""
import math

from policy.fast_forward import plan_decode_stretch


def delay_to(now: float, t: float) -> float | None:
    """A delay d with now + d == t exactly, or None if there is none. simpy adds delays to
    its clock, and the step-by-step loop's clock is a sum of step durations: t - now may
    land an ulp away from t, and with round-half-even some t are out of reach."""
    d = t - now
    while now + d < t:
        d = math.nextafter(d, math.inf)
    while now + d > t:
        d = math.nextafter(d, -math.inf)
    return d if now + d == t else None


def skip_decode_steps(env, replica, state, cost, num_blocks: int):
    """A simpy sub-process (`yield from`): if the replica's next steps are a decode stretch,
    simulate as many of them as end before the next arrival, recording each step and
    advancing the clock to the end of the last. Returns (steps taken, sequences finished);
    (0, []) when the next step must go through the step-by-step loop."""
    pending = len(state.sequences)       # the next request the arrival process will add
    next_arrival = (state.requests[pending].arrival_s if pending < len(state.requests)
                    else math.inf)
    if state.steps and next_arrival - env.now < 2 * state.steps[-1]["duration_s"]:
        return 0, []     # room for a step or two at most: planning would cost what it saves
    stretch = plan_decode_stretch(replica.scheduler, state.salt)
    if stretch is None:
        return 0, []
    t, times, records = env.now, [], []
    predict, r, step = cost.predict, replica.index, replica.num_steps
    for j in range(stretch.max_steps):
        features = stretch.features(j)
        dt = predict(features)
        end = t + dt
        if end >= next_arrival:      # an arrival would be seen by the next schedule
            break
        features.update(start_s=t, duration_s=dt, replica=r, step=step + j,
                        kv_usage=features["kv_blocks_used"] / num_blocks)
        records.append(features)
        times.append(end)
        t = end
    if not times:
        return 0, []
    delay = delay_to(env.now, t)
    if delay is not None:
        yield env.timeout(delay)
    else:                            # the clock the step-by-step loop would reach, step by step
        for record in records:
            yield env.timeout(record["duration_s"])
    finished = stretch.apply(len(times), times)
    state.steps += records
    replica.num_steps += len(times)
    return len(times), finished
