"""The noise schedulers a request may ask for: the one list.

"default" is the server's SDSERVE_SCHEDULER, or the model's own scheduler when that is
"default" too. The operator's CRD lists the same names (``sdop.api.spec.Scheduler``);
tests/unit/test_config_contract.py ties the two.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

SchedulerName = Literal["default", "euler", "euler_a", "dpmpp_2m", "ddim"]

#: name -> (diffusers class, extra config) for every name but "default".
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
}

NAMES: tuple[str, ...] = get_args(SchedulerName)
assert set(NAMES) == {"default", *SCHEDULERS}, "SchedulerName and SCHEDULERS must list the same names"
