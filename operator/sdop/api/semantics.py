"""Rules a CR can break while passing the CRD schema: they depend on the GPU preset table.

The operator reports a broken rule as Degraded with the field named and applies nothing;
``sdop validate`` prints the same problems.
"""

from __future__ import annotations

from .presets import GPU_PRODUCT_LABEL, PRESETS, preset
from .spec import StableDiffusionServiceSpec


def problems(spec: StableDiffusionServiceSpec) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    cache = spec.model.cache
    if cache.enabled and cache.access_mode == "ReadWriteOnce" and spec.replicas.max > 1:
        out.append(
            (
                "spec.model.cache.accessMode",
                f"ReadWriteOnce with replicas.max {spec.replicas.max}: replicas on other nodes cannot mount the "
                "volume (Multi-Attach error); use ReadWriteMany or replicas.max 1",
            )
        )
    out += checker_problems(spec)
    gpu_type = spec.gpu.type
    if spec.server.quantization == "fp8" and spec.gpu.count == 0:
        out.append(("spec.server.quantization", "fp8 needs a GPU of compute capability 8.9 or newer (L4, H100)"))
    if gpu_type not in PRESETS:
        if spec.gpu.count == 0 and spec.model.pipeline == "sdxl" and spec.model.id != "tiny":
            out.append(("spec.gpu.count", "SDXL needs a GPU: set gpu.count >= 1 (only model.id tiny runs on a CPU)"))
        return out
    p = PRESETS[gpu_type]
    product = spec.scheduling.node_selector.get(GPU_PRODUCT_LABEL)
    if product is not None and product not in p.labels.get("product", ()):
        out.append(
            (
                f"spec.scheduling.nodeSelector[{GPU_PRODUCT_LABEL}]",
                f"selects {product!r} but gpu.type {gpu_type} means one of {list(p.labels.get('product', ()))}; use "
                "gpu.type custom to pick nodes yourself",
            )
        )
    if spec.gpu.match != "none" and not spec.gpu.node_label_values and not p.label_values(spec.gpu.match):
        out.append(
            (
                "spec.gpu.match",
                f"no {spec.gpu.match} label value is known for gpu.type {gpu_type}; set gpu.nodeLabelValues or "
                "gpu.match none",
            )
        )
    if spec.gpu.count == 0:
        out.append(
            ("spec.gpu.count", f"gpu.type {gpu_type} needs gpu.count >= 1 (use gpu.type custom for CPU replicas)")
        )
    mbs = spec.batching.max_batch_size
    if mbs is not None and mbs > p.max_batch_size:
        out.append(
            (
                "spec.batching.maxBatchSize",
                f"{mbs} exceeds what {gpu_type} fits ({p.max_batch_size}); lower it or use gpu.type custom",
            )
        )
    # Sides set explicitly must fit; defaults are capped to the preset (see max_sides()).
    for name, attr in (("maxWidth", "max_width"), ("maxHeight", "max_height")):
        value = getattr(spec.limits, attr)
        if attr in spec.limits.model_fields_set and value > p.max_side:
            out.append((f"spec.limits.{name}", f"{value} exceeds the largest side {gpu_type} fits ({p.max_side})"))
    # Sizes the server starts with must be within the sides it is given (capped by the preset).
    width, height = max_sides(spec)
    sized = [(f"spec.server.warmupSizes[{i}]", z) for i, z in enumerate(spec.server.warmup_sizes)]
    sized += [("spec.defaults.size", spec.defaults.size)] if spec.defaults.size else []
    for field, z in sized:
        if z.width > width or z.height > height:
            out.append((field, f"{z.width}x{z.height} exceeds the largest size {gpu_type} fits ({width}x{height})"))
    if spec.server.quantization == "fp8" and spec.gpu.count > 0 and p.compute_capability < (8, 9):
        cc = ".".join(map(str, p.compute_capability))
        out.append(
            (
                "spec.server.quantization",
                f"fp8 needs compute capability 8.9 or newer (L4, RTX 4090, H100); {gpu_type} is {cc}: use "
                "int8_weight_only or none",
            )
        )
    if spec.gpu.count > 0 and p.compute_capability < (8, 0):  # Turing and older: no bfloat16 tensor cores
        models = [("spec.model.dtype", spec.model)] + (
            [("spec.canary.model.dtype", spec.canary.model)] if spec.canary else []
        )
        for field, m in models:
            if m.dtype == "bfloat16":
                cc = ".".join(map(str, p.compute_capability))
                out.append((field, f"bfloat16 needs compute capability 8.0 or newer; {gpu_type} is {cc}: use float16"))
    if spec.model.pipeline == "sdxl" and p.gpu_memory_gib < 16:
        out.append(("spec.model.pipeline", f"sdxl does not fit {gpu_type} ({p.gpu_memory_gib} GiB)"))
    return out


def checker_problems(spec: StableDiffusionServiceSpec) -> list[tuple[str, str]]:
    """safety.nsfwCheck without safety.checker loads the model's own safety_checker folder, which
    SD 1.x ships and SDXL, single-file checkpoints and the tiny model do not: the server would
    fail its load, so the CR is refused here, naming the field to set."""
    if not spec.safety.nsfw_check or spec.safety.checker:
        return []
    out = []
    models = [("spec.model", spec.model)] + ([("spec.canary.model", spec.canary.model)] if spec.canary else [])
    for field, m in models:
        file = m.path or (m.pvc.sub_path if m.pvc else "")
        if m.pipeline == "sdxl" or m.id == "tiny" or file.endswith((".safetensors", ".ckpt")):
            what = "an SDXL model" if m.pipeline == "sdxl" else "a single-file checkpoint" if file else "model tiny"
            out.append(
                (
                    "spec.safety.checker",
                    f"safety.nsfwCheck needs a safety checker and {field} is {what}, which ships none: set "
                    "safety.checker, e.g. CompVis/stable-diffusion-safety-checker",
                )
            )
    return out


def max_batch_size(spec: StableDiffusionServiceSpec) -> int:
    return spec.batching.max_batch_size or preset(spec.gpu.type).max_batch_size


def max_sides(spec: StableDiffusionServiceSpec) -> tuple[int, int]:
    """Largest width and height the server allows: explicit values, or defaults capped by the GPU preset."""
    side = preset(spec.gpu.type).max_side
    out = []
    for attr in ("max_width", "max_height"):
        value = getattr(spec.limits, attr)
        out.append(value if attr in spec.limits.model_fields_set else min(value, side))
    return out[0], out[1]
