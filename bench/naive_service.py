"""The seed's service shape, for comparison only: the pipeline is called inside the async
handler, so the event loop (and /healthz) waits for every generation, and nothing batches."""

from __future__ import annotations

import base64
import io
import os

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from sdserve.tiny import build_tiny_pipeline

app = FastAPI()
pipe = build_tiny_pipeline()


class Req(BaseModel):
    prompt: str
    width: int = 512
    height: int = 512
    num_inference_steps: int = 25
    seed: int | None = None


@app.post("/generate")
async def generate(req: Req):
    import torch

    gen = torch.Generator().manual_seed(req.seed or 0)
    image = pipe(
        req.prompt, width=req.width, height=req.height, num_inference_steps=req.num_inference_steps, generator=gen
    ).images[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "status": "success"}


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
