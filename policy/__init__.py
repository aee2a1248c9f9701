"""The policy layer shared by the engine and the simulator: who runs each step, and where
its KV lives. Pure Python: no torch, no simpy, no wall clock (time is passed in)."""
from policy.batch import Batch
from policy.block_manager import BlockManager
from policy.config import CacheConfig, SchedulerConfig
from policy.scheduler import Scheduler
from policy.sequence import Sequence, SequenceStatus

__all__ = ["Batch", "BlockManager", "CacheConfig", "SchedulerConfig", "Scheduler",
           "Sequence", "SequenceStatus"]
