"""GPU node placement per cluster kind, and a model cache that binds and is filled once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from sdop.api import SpecError, load
from sdop.api.presets import PRESETS, preset
from sdop.render import render
from sdtesting.examples import ROOT, by_kind, example


def rendered(mutate) -> dict:
    cr = example("sd15-production")
    mutate(cr["spec"])
    return by_kind(render(cr))


def gpu_terms(pod: dict) -> list[dict]:
    return pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


def server_pod(objs: dict) -> dict:
    return objs[("Deployment", "sd15")]["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("gpu", "key", "values"),
    [
        ({"type": "a100-40gb"}, "nvidia.com/gpu.product", ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"]),
        (
            {"type": "h100-80gb"},
            "nvidia.com/gpu.product",
            ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"],
        ),
        ({"type": "a100-40gb", "match": "gke"}, "cloud.google.com/gke-accelerator", ["nvidia-tesla-a100"]),
        ({"type": "h100-80gb", "match": "karpenter"}, "karpenter.k8s.aws/instance-gpu-name", ["h100"]),
        ({"type": "l4-24gb", "match": "gke"}, "cloud.google.com/gke-accelerator", ["nvidia-l4"]),
        ({"type": "l40s-48gb", "match": "eks-auto"}, "eks.amazonaws.com/instance-gpu-name", ["l40s"]),
        ({"type": "a10g-24gb"}, "nvidia.com/gpu.product", ["NVIDIA-A10G"]),
        ({"type": "t4-16gb", "match": "karpenter"}, "karpenter.k8s.aws/instance-gpu-name", ["t4"]),
        ({"type": "h200-141gb"}, "nvidia.com/gpu.product", ["NVIDIA-H200", "NVIDIA-H200-NVL"]),
        (
            {"type": "a100-40gb", "nodeLabelValues": ["NVIDIA-A100-SXM4-80GB"]},
            "nvidia.com/gpu.product",
            ["NVIDIA-A100-SXM4-80GB"],
        ),
    ],
)
def test_replicas_select_every_form_factor_of_the_preset_gpu(gpu, key, values):
    def on(spec: dict) -> None:
        spec["gpu"].update(gpu)
        spec["batching"]["maxBatchSize"] = min(spec["batching"]["maxBatchSize"], preset(gpu["type"]).max_batch_size)

    objs = rendered(on)
    pod = server_pod(objs)
    assert gpu_terms(pod) == [{"matchExpressions": [{"key": key, "operator": "In", "values": values}]}]
    assert "nvidia.com/gpu.product" not in pod.get("nodeSelector", {})
    # The preset still sizes the replica.
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_match_none_leaves_only_the_gpu_request():
    pod = server_pod(rendered(lambda s: s["gpu"].update({"match": "none"})))
    assert "affinity" not in pod and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_gpu_requirement_is_added_to_each_user_affinity_term():
    zone = {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a", "b"]}]}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [zone]}}}
    pod = server_pod(rendered(lambda s: s["scheduling"].update({"affinity": affinity})))
    (term,) = gpu_terms(pod)
    assert [e["key"] for e in term["matchExpressions"]] == ["topology.kubernetes.io/zone", "nvidia.com/gpu.product"]


def test_a_match_without_a_known_label_value_is_refused():
    cr = example("sd15-production")
    cr["spec"]["gpu"] = {"type": "rtx4090-24gb", "match": "gke"}
    cr["spec"]["batching"]["maxBatchSize"] = 4
    with pytest.raises(SpecError) as e:
        load(cr)
    assert e.value.fields == ["spec.gpu.match"]


def test_a_preset_sizes_the_replica_for_its_smallest_cloud_instance():
    """The L4's preset fits a g6.xlarge or g2-standard-4 (4 vCPUs, 16 GiB): a request above
    what such a node has to give would leave the pod Pending on every node of that GPU."""
    cr = example("minimal")
    cr["spec"]["gpu"] = {"type": "l4-24gb", "match": "gke"}
    objs = by_kind(render(cr))
    container = objs[("Deployment", "sd-minimal")]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "3", "memory": "12Gi"}
    config = objs[("ConfigMap", "sd-minimal-config")]["data"]
    assert (config["SDSERVE_MAX_BATCH_SIZE"], config["SDSERVE_MAX_WIDTH"]) == ("4", "1024")


@pytest.mark.parametrize(("gpu", "refused"), [("t4-16gb", True), ("l4-24gb", False), ("a100-80gb", False)])
def test_bfloat16_is_refused_on_a_gpu_without_it(gpu, refused):
    cr = example("minimal")
    cr["spec"]["gpu"] = {"type": gpu}
    cr["spec"]["model"]["dtype"] = "bfloat16"
    if not refused:
        render(cr)
        return
    with pytest.raises(SpecError) as e:
        load(cr)
    assert e.value.fields == ["spec.model.dtype"] and "8.0" in str(e.value) and "7.5" in str(e.value)
    cr["spec"]["model"]["dtype"] = "float16"
    cr["spec"]["canary"] = {"model": {"id": "other/model", "dtype": "bfloat16"}}
    with pytest.raises(SpecError) as e:
        load(cr)
    assert e.value.fields == ["spec.canary.model.dtype"]


def test_no_karpenter_value_picks_the_80_gb_a100():
    """Karpenter calls both A100 sizes a100: a match on it could land the 80 GB preset's
    batch on a 40 GB card, so it is refused unless the nodes are named."""
    cr = example("minimal")
    cr["spec"]["gpu"] = {"type": "a100-80gb", "match": "karpenter"}
    with pytest.raises(SpecError) as e:
        load(cr)
    assert e.value.fields == ["spec.gpu.match"]
    cr["spec"]["gpu"]["nodeLabelValues"] = ["a100"]
    render(cr)


def test_the_preset_table_in_the_docs_is_the_operators():
    rows = {}
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and cells[0] in PRESETS:
            rows[cells[0]] = cells
    assert set(rows) == set(PRESETS)
    for name, p in PRESETS.items():

        def values(match: str, p=p) -> str:
            return ", ".join(f"`{v}`" for v in p.labels.get(match, ())).strip("`") or "-"

        expected = [
            name,
            f"{p.gpu_memory_gib} GiB",
            str(p.max_batch_size),
            str(p.max_side),
            f"{p.cpu} / {p.memory}",
            ".".join(map(str, p.compute_capability)),
            values("product"),
            values("gke"),
            values("karpenter"),
        ]
        assert rows[name] == expected, name


def test_more_than_one_gpu_per_replica_is_refused():
    cr = example("sd15-production")
    cr["spec"]["gpu"]["count"] = 2
    with pytest.raises(SpecError) as e:
        load(cr)
    assert "spec.gpu.count" in e.value.fields


def test_sdxl_on_cpu_nodes_is_refused_except_for_the_tiny_model():
    cr = example("tiny-cpu")
    cr["spec"]["model"]["pipeline"] = "sdxl"
    load(cr)  # the tiny SDXL pipeline runs on a CPU
    cr["spec"]["model"]["id"] = "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(SpecError) as e:
        load(cr)
    assert e.value.fields == ["spec.gpu.count"]


def test_the_cache_access_mode_follows_the_replica_count():
    several = rendered(lambda s: s["model"]["cache"].pop("accessMode", None))
    (pvc,) = [o for (k, _), o in several.items() if k == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # replicas.max 8: several nodes share it
    one = rendered(lambda s: s.update({"replicas": {"min": 1, "max": 1}}))
    (pvc,) = [o for (k, _), o in one.items() if k == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # what every default StorageClass offers
    cr = example("sd15-production")
    cr["spec"]["model"]["cache"]["accessMode"] = "ReadWriteOnce"
    with pytest.raises(SpecError) as e:
        load(cr)
    assert e.value.fields == ["spec.model.cache.accessMode"]


def test_replicas_wait_for_the_prefetch_marker_and_the_job_runs_on_gpu_nodes():
    objs = rendered(lambda s: None)
    (job,) = [o for (k, _), o in objs.items() if k == "Job"]
    job_pod = job["spec"]["template"]["spec"]
    args = job_pod["containers"][0]["args"]
    marker = args[args.index("--marker") + 1]
    (wait,) = server_pod(objs)["initContainers"]
    assert wait["args"][:3] == ["wait-for", "--path", marker]
    assert gpu_terms(job_pod) == gpu_terms(server_pod(objs))
    assert job_pod["tolerations"] == server_pod(objs)["tolerations"]
    assert "--safety-checker" not in args  # sd15-production checks with the model's own checker
    checked = rendered(lambda s: s["safety"].update(checker="CompVis/stable-diffusion-safety-checker"))
    (job,) = [o for (k, _), o in checked.items() if k == "Job"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--safety-checker") + 1] == "CompVis/stable-diffusion-safety-checker"
    assert args[args.index("--marker") + 1] != marker  # replicas wait for the checker too


def test_the_prefetch_job_downloads_the_lora_adapters_given_as_repos():
    """Each replica loads them from the cache the Job filled, not from the Hub on its own; an
    adapter given as a path is in the image or the volume already. Another adapter is another
    marker, so the replicas wait for it too."""
    loras = [
        {"name": "pixel", "id": "nerijs/pixel-art-xl", "weightName": "pixel-art-xl.safetensors"},
        {"name": "ink", "id": "someone/ink-lora"},
        {"name": "house", "path": "/models/loras/house.safetensors"},
    ]
    plain = rendered(lambda s: None)
    objs = rendered(lambda s: s["model"].update(loras=loras))
    (job,) = [o for (k, _), o in objs.items() if k == "Job"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    asked = [args[i + 1] for i, a in enumerate(args) if a == "--lora"]
    assert asked == ["nerijs/pixel-art-xl@pixel-art-xl.safetensors", "someone/ink-lora"]
    marker = args[args.index("--marker") + 1]
    assert (
        server_pod(objs)["initContainers"][0]["args"][2] == marker != server_pod(plain)["initContainers"][0]["args"][2]
    )


def test_prefetch_downloads_the_model_the_safety_checker_and_the_adapters_before_the_marker(tmp_path, monkeypatch):
    """No network here: the Hub's download function is replaced by one that records its calls."""
    import huggingface_hub

    from sdserve.cli import main

    asked: list[tuple[str, dict]] = []
    marker = tmp_path / "marker"

    def download(repo_id, **kwargs):
        assert not marker.exists()  # the marker comes after every download
        asked.append((repo_id, kwargs))
        return f"/cache/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    args = ["prefetch", "--model", "a/model", "--variant", "fp16", "--marker", str(marker)]
    loras = ["--lora", "l/one", "--lora", "l/two@sub/two.safetensors"]
    assert main([*args, "--safety-checker", "c/checker", *loras]) == 0
    assert [repo for repo, _ in asked] == ["a/model", "c/checker", "l/one", "l/two"]
    assert "allow_patterns" in asked[0][1] and "allow_patterns" not in asked[1][1]  # the checker whole
    # an adapter's weights (the named file, else its .safetensors), not the sample images of its repo
    assert asked[2][1]["allow_patterns"] == ["*.safetensors", "*.json"]
    assert asked[3][1]["allow_patterns"] == ["sub/two.safetensors", "*.json"]
    assert '"path": "/cache/a/model"' in marker.read_text()


def test_wait_for_returns_once_the_marker_appears(tmp_path):
    from sdserve.cli import write_marker

    marker = tmp_path / ".sdop" / "prefetched-x"
    cmd = [
        sys.executable,
        "-m",
        "sdserve.cli",
        "wait-for",
        "--path",
        str(marker),
        "--interval",
        "0.1",
        "--timeout",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert proc.poll() is None  # still waiting
    threading.Timer(0.2, write_marker, (marker, '{"model": "m"}')).start()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and '"model": "m"' in out
    late = subprocess.run(
        [*cmd[:5], str(tmp_path / "never"), "--interval", "0.1", "--timeout", "0.3"], capture_output=True, text=True
    )
    assert late.returncode == 1 and "prefetch Job" in late.stdout
