"""`make demo`: serve the built-in tiny model and generate images through the OpenAI-compatible API.

Two servers, one after the other, on the CPU: the default (request-level batching) answers a
plain request for two images; then one with step-level batching (SDSERVE_BATCHING=step) serves
three requests with different step counts, guidance scales and schedulers at once, in shared
UNet forwards, and streams a fourth with partial images.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PROMPT = "a lighthouse at dawn, oil painting"
#: Three requests request-level batching could not put in one batch: each its own parameters.
MIXED: list[dict[str, Any]] = [
    {"num_inference_steps": 8, "guidance_scale": 7.5, "scheduler": "euler"},
    {"num_inference_steps": 12, "guidance_scale": 3.0, "scheduler": "ddim"},
    {"num_inference_steps": 16, "guidance_scale": 1.0, "scheduler": "dpmpp_2m"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(**env: str) -> Iterator[str]:
    """An sdserve process on the tiny model, ready; its base URL. Stopped on the way out."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sdserve", "--model", "tiny", "--port", str(port), "--host", "127.0.0.1"],
        env=dict(os.environ, SDSERVE_MIN_SIDE="64", SDSERVE_LOG_LEVEL="warning", **env),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("server did not become ready")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=60)


def metrics(base: str) -> dict[str, float]:
    """The server's unlabelled samples, by name."""
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) ([-+.\deE]+)$", text, re.MULTILINE)}


def save(out: pathlib.Path, name: str, b64: str | None) -> None:
    path = out / name
    path.write_bytes(base64.b64decode(b64 or ""))
    print(f"== wrote {path} ({path.stat().st_size} bytes)")


def request_batching(out: pathlib.Path) -> None:
    from openai import OpenAI

    with serving() as base:
        print(f"== sdserve is ready on {base} (model tiny, CPU, request-level batching)")
        client = OpenAI(base_url=base + "/v1", api_key="demo")
        t0 = time.perf_counter()
        resp = client.images.generate(
            model="tiny",
            prompt=PROMPT,
            n=2,
            size="128x128",
            response_format="b64_json",
            extra_body={"seed": 42, "num_inference_steps": 10},
        )
        took = time.perf_counter() - t0
        for i, img in enumerate(resp.data or []):
            save(out, f"tiny-{i}.png", img.b64_json)
        print(
            f"== 2 images via the OpenAI SDK in {took:.2f}s (random-weight tiny model: the images are noise patterns)"
        )
        m = metrics(base)
        for name in ("sdserve_images_generated_total", "sdserve_batch_size_count", "sdserve_model_load_seconds"):
            print(f"   {name} {m.get(name, 0):g}")


def step_batching(out: pathlib.Path) -> None:
    from openai import OpenAI

    with serving(SDSERVE_BATCHING="step") as base:
        print(f"\n== sdserve is ready on {base} (step-level batching: SDSERVE_BATCHING=step)")
        client = OpenAI(base_url=base + "/v1", api_key="demo")

        def generate(i: int, params: dict[str, Any]) -> Any:
            return client.images.generate(
                model="tiny", prompt=PROMPT, size="128x128", extra_body={"seed": 7 + i, **params}
            )

        before = metrics(base)
        with ThreadPoolExecutor(len(MIXED)) as pool:
            answers = list(pool.map(generate, range(len(MIXED)), MIXED))
        for i, (params, resp) in enumerate(zip(MIXED, answers, strict=True)):
            save(out, f"tiny-step-{i}.png", (resp.data or [])[0].b64_json)
            print("   " + ", ".join(f"{k} {v}" for k, v in params.items()))
        m = metrics(base)
        forwards = m["sdserve_batch_size_count"] - before.get("sdserve_batch_size_count", 0)
        images = m["sdserve_batch_size_sum"] - before.get("sdserve_batch_size_sum", 0)
        steps = sum(p["num_inference_steps"] for p in MIXED)
        print(
            f"== {len(MIXED)} requests, {steps} denoising steps in all, in {forwards:g} UNet forwards: "
            f"{images / forwards:.2f} images per forward (request-level batching runs each alone: 1.00)"
        )

        events = client.images.generate(
            model="tiny",
            prompt=PROMPT,
            size="128x128",
            stream=True,
            partial_images=2,
            extra_body={"seed": 3, "num_inference_steps": 30},
        )
        for e in events:
            if e.type == "image_generation.partial_image":
                save(out, f"tiny-partial-{e.partial_image_index}.png", e.b64_json)
            else:
                save(out, "tiny-streamed.png", e.b64_json)
        print("== streamed: partial images (latent previews, one pixel per latent pixel), then the image")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="demo-output")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        request_batching(out)
        step_batching(out)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
