"""One cost model (docs/design.md, Cost predictor): what serving an expert costs, for placement
(``routing/placement.py``), the engine's predictor and calibration (``runtime/calibrate.py``) and the
simulator.

- ``hardware``: hardware profiles, what ``--profile`` names on every command (a built-in name or a .json file);
- ``shapes``: model shapes, bytes per expert at a precision (the one int8 byte formula);
- ``curves``: cost curves T_cpu(n), T_gpu(n), the copy T_e, splits, the miss cost and the decisions;
- ``roofline``: a profile and a shape -> a ``CostModel``, attention and head times, GPU memory;
- ``planning``: the request-level objective the latency placement strategies minimise.
"""

from importlib import import_module

_WHERE = {  # name -> submodule: resolved on first use, so that ``costs.hardware`` (profile names for the
    # CLI's help) imports without numpy
    **dict.fromkeys(("DECISION_POLICIES", "SPLIT_STEPS", "CostCurve", "CostModel", "copied_share"), "curves"),
    **dict.fromkeys(("DEFAULT_PROFILE", "GB", "PROFILES", "PROFILE_HELP", "HardwareProfile", "load_profile"),
                    "hardware"),
    **dict.fromkeys(("DEFAULT_DECODE_TOKENS", "PlanningCosts", "planning_costs", "planning_costs_for"), "planning"),
    **dict.fromkeys(("MemoryPlan", "cost_model_for", "head_ms", "memory_plan", "nonexpert_layer_ms"), "roofline"),
    **dict.fromkeys(("MODELS", "ModelSpec", "int8_bytes", "model_spec", "shape_for"), "shapes"),
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
