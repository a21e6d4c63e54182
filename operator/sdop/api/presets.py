"""GPU type presets: the hardware matrix users pick from instead of tuning by hand.

Each preset says what a replica of that GPU can sustain for SD 1.5 at 512x512 in fp16:
the largest batch that fits with headroom, the host memory and CPU to request, the node
label that GPU feature discovery puts on such nodes, and the largest image side that
fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GpuType = Literal[
    "t4-16gb",
    "rtx3080-10gb",
    "rtx4090-24gb",
    "a10g-24gb",
    "l4-24gb",
    "l40s-48gb",
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
    "h200-141gb",
    "custom",
]

#: Node label set by NVIDIA GPU feature discovery (part of the GPU operator).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

#: How replicas find nodes with the preset's GPU: the node label each method reads.
#: product: NVIDIA GPU feature discovery (the GPU operator, on-prem and any cloud with it);
#: gke: GKE's accelerator label; karpenter: Karpenter's GPU name label (EKS); eks-auto: EKS Auto
#: Mode's (the same values under its own prefix); none: no GPU model constraint (any node with
#: the device plugin's resource).
GpuMatch = Literal["product", "gke", "karpenter", "eks-auto", "none"]
MATCH_LABELS: dict[str, str] = {
    "product": GPU_PRODUCT_LABEL,
    "gke": "cloud.google.com/gke-accelerator",
    "karpenter": "karpenter.k8s.aws/instance-gpu-name",
    "eks-auto": "eks.amazonaws.com/instance-gpu-name",
}


@dataclass(frozen=True)
class GpuPreset:
    gpu_memory_gib: int
    max_batch_size: int
    max_side: int
    cpu: str
    memory: str
    #: Label values per match method: every form factor of the GPU (SXM and PCIe cards differ
    #: in GPU feature discovery's product name). A method missing here cannot select it.
    labels: dict[str, tuple[str, ...]]
    #: CUDA compute capability (fp8 kernels need 8.9 or newer, bfloat16 8.0); (0, 0) for custom: unknown.
    compute_capability: tuple[int, int] = (0, 0)

    @property
    def product(self) -> str:
        return self.labels["product"][0] if self.labels.get("product") else ""

    def label_values(self, match: str) -> tuple[str, ...]:
        """The node label values that select this GPU by ``match`` (EKS Auto Mode names GPUs as
        Karpenter does)."""
        return self.labels.get("karpenter" if match == "eks-auto" else match, ())


#: The cloud GPUs' CPU and memory fit their smallest instance with one such GPU (AWS g4dn, g5 and
#: g6 .xlarge, GKE g2-standard-4: 4 vCPUs, 16 GiB; g6e.xlarge: 4 vCPUs, 32 GiB), less what the
#: kubelet and the node's daemons keep. Batch sizes and sides scale with the GPU's memory as the
#: measured ones do (H200: ``bench/results/gpu_pipeline_sd15.json``, batch 16 at 512x512).
PRESETS: dict[str, GpuPreset] = {
    "t4-16gb": GpuPreset(
        16,
        2,
        1024,
        "3",
        "12Gi",
        {"product": ("Tesla-T4",), "gke": ("nvidia-tesla-t4",), "karpenter": ("t4",)},
        (7, 5),
    ),
    "rtx3080-10gb": GpuPreset(10, 2, 768, "4", "16Gi", {"product": ("NVIDIA-GeForce-RTX-3080",)}, (8, 6)),
    "rtx4090-24gb": GpuPreset(24, 4, 1024, "6", "24Gi", {"product": ("NVIDIA-GeForce-RTX-4090",)}, (8, 9)),
    "a10g-24gb": GpuPreset(24, 4, 1024, "3", "12Gi", {"product": ("NVIDIA-A10G",), "karpenter": ("a10g",)}, (8, 6)),
    "l4-24gb": GpuPreset(
        24,
        4,
        1024,
        "3",
        "12Gi",
        {"product": ("NVIDIA-L4",), "gke": ("nvidia-l4",), "karpenter": ("l4",)},
        (8, 9),
    ),
    "l40s-48gb": GpuPreset(48, 8, 1024, "3", "24Gi", {"product": ("NVIDIA-L40S",), "karpenter": ("l40s",)}, (8, 9)),
    "a100-40gb": GpuPreset(
        40,
        8,
        1024,
        "8",
        "48Gi",
        {
            "product": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
            "gke": ("nvidia-tesla-a100",),
            "karpenter": ("a100",),
        },
        (8, 0),
    ),
    # Karpenter names both A100 sizes "a100" (p4d: 40 GB, p4de: 80 GB): no value selects only the
    # 80 GB one there.
    "a100-80gb": GpuPreset(
        80,
        16,
        1536,
        "8",
        "48Gi",
        {"product": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"), "gke": ("nvidia-a100-80gb",)},
        (8, 0),
    ),
    "h100-80gb": GpuPreset(
        80,
        16,
        1536,
        "12",
        "64Gi",
        {
            "product": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
            "gke": ("nvidia-h100-80gb", "nvidia-h100-mega-80gb"),
            "karpenter": ("h100",),
        },
        (9, 0),
    ),
    "h200-141gb": GpuPreset(
        141,
        16,
        2048,
        "12",
        "64Gi",
        {"product": ("NVIDIA-H200", "NVIDIA-H200-NVL"), "gke": ("nvidia-h200-141gb",), "karpenter": ("h200",)},
        (9, 0),
    ),
}

#: What a ``custom`` GPU gets: the conservative end of the matrix.
CUSTOM = GpuPreset(0, 4, 1024, "4", "16Gi", {})


def preset(gpu_type: str) -> GpuPreset:
    return PRESETS.get(gpu_type, CUSTOM)
