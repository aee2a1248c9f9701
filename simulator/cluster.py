"""Replicas behind a router. A replica is one engine (one `Scheduler` and its KV pool); the
router picks a replica for each arriving request, looking only at state a real load
balancer could query (queue lengths, the replica's prefix cache)."""
from policy import Scheduler, Sequence


class Replica:
    """One engine's policy state, plus the simpy event its step loop sleeps on when idle."""

    def __init__(self, index: int, scheduler: Scheduler):
        self.index = index
        self.scheduler = scheduler
        self.idle = None          # simpy event while the step loop waits for work
        self.num_steps = 0
        self.executor = None      # the simulator's SimExecutor and policy StepLoop (set by run)
        self.loop = None

    @property
    def outstanding(self) -> int:
        """Requests routed here and not finished."""
        return self.scheduler.num_waiting + self.scheduler.num_running

    def wake(self) -> None:
        if self.idle is not None:
            self.idle.succeed()
            self.idle = None


def round_robin(seq: Sequence, replicas: list[Replica], num_routed: int) -> int:
    """Replicas in turn."""
    return num_routed % len(replicas)


def least_outstanding(seq: Sequence, replicas: list[Replica], num_routed: int) -> int:
    """The replica with the fewest unfinished requests (lowest index on ties)."""
    return min(replicas, key=lambda r: (r.outstanding, r.index)).index


def prefix_affinity(seq: Sequence, replicas: list[Replica], num_routed: int) -> int:
    """The replica whose prefix cache holds the longest prefix of the prompt; fewest
    unfinished requests breaks ties (so with no hits anywhere it balances load)."""
    def key(r: Replica):
        cached = r.scheduler.block_manager.count_cached_tokens(seq.token_ids, seq.extra_keys)
        return -cached, r.outstanding, r.index
    return min(replicas, key=key).index


ROUTERS = {"round_robin": round_robin, "least_outstanding": least_outstanding,
           "prefix_affinity": prefix_affinity}
