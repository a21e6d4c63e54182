"""`make demo`: serve the built-in tiny model and generate an image through the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import base64
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="demo-output")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, SDSERVE_MIN_SIDE="64", SDSERVE_LOG_LEVEL="warning")
    server = subprocess.Popen(
        [sys.executable, "-m", "sdserve", "--model", "tiny", "--port", str(port), "--host", "127.0.0.1"], env=env
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
            print("server did not become ready", file=sys.stderr)
            return 1
        print(f"== sdserve is ready on {base} (model tiny, CPU)")
        from openai import OpenAI

        client = OpenAI(base_url=base + "/v1", api_key="demo")
        t0 = time.perf_counter()
        resp = client.images.generate(
            model="tiny",
            prompt="a lighthouse at dawn, oil painting",
            n=2,
            size="128x128",
            response_format="b64_json",
            extra_body={"seed": 42, "num_inference_steps": 10},
        )
        took = time.perf_counter() - t0
        for i, img in enumerate(resp.data or []):
            path = out / f"tiny-{i}.png"
            path.write_bytes(base64.b64decode(img.b64_json or ""))
            print(f"== wrote {path} ({path.stat().st_size} bytes)")
        print(
            f"== 2 images via the OpenAI SDK in {took:.2f}s (random-weight tiny model: the images are noise patterns)"
        )
        with urllib.request.urlopen(base + "/metrics") as r:
            for line in r.read().decode().splitlines():
                if line.startswith(
                    ("sdserve_images_generated_total", "sdserve_batch_size_count", "sdserve_model_load_seconds")
                ):
                    print("   " + line)
        return 0
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
