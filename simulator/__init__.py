"""The simulator executor: the policy layer's step loop in simpy, with a cost model
standing in for the GPU (roofline, fitted on the engine, or replayed from a real run)."""
from simulator.cluster import ROUTERS
from simulator.cost_model import (CostModel, CostModelConfig, CudaGraphs, FittedCostModel,
                                  ModelSpec, ReplayCostModel, RooflineCostModel, build_cost_model,
                                  kv_pool_blocks)
from simulator.hardware import HardwareSpec, HostCosts
from simulator.sim import SimResult, Simulator

__all__ = ["CostModel", "CostModelConfig", "CudaGraphs", "FittedCostModel", "HardwareSpec",
           "HostCosts", "ModelSpec", "ROUTERS", "ReplayCostModel", "RooflineCostModel", "SimResult",
           "Simulator", "build_cost_model", "kv_pool_blocks"]
