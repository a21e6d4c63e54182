"""The noise schedulers a request may ask for: the one list.

"default" is the server's SDSERVE_SCHEDULER, or the model's own scheduler when that is
"default" too. The operator's CRD lists the same names (``sdop.api.spec.Scheduler``);
tests/unit/test_config_contract.py ties the two.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

SchedulerName = Literal["default", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm"]

#: name -> (diffusers class, extra config) for every name but "default".
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # "DPM++ 2M Karras" of other UIs: the same solver on Karras et al.'s noise levels.
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    # Latent consistency: what an LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) needs, at 4-8
    # steps and guidance 1-2.
    "lcm": ("LCMScheduler", {}),
}

NAMES: tuple[str, ...] = get_args(SchedulerName)
assert set(NAMES) == {"default", *SCHEDULERS}, "SchedulerName and SCHEDULERS must list the same names"
