"""A job's request as stored for another replica to run it, and read back."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from .. import steps
from ..encode import ImageFormat
from ..work import BatchKey

SPEC_VERSION = 1


def spec_of(gen: steps.Generation, urls: bool) -> str:
    """A job's request, for the replica that takes it up (``generation_of``): the validated
    generation, with an edit's input image and mask as PNG (lossless: the same pixels)."""
    import base64
    import io

    def png(image: Any) -> str | None:
        if image is None:
            return None
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    return json.dumps(
        {
            "v": SPEC_VERSION,
            "key": asdict(gen.key),
            "prompt": gen.prompt,
            "negative_prompt": gen.negative_prompt,
            "n": gen.n,
            "seed": gen.seed,
            "init_image": png(gen.init_image),
            "mask_image": png(gen.mask_image),
            "inputs_digest": gen.inputs_digest,
            "preview": gen.preview,
            "output": asdict(gen.output),
            "principal": gen.principal,
            "model": gen.model,
            "urls": urls,
        }
    )


def generation_of(spec: str) -> tuple[steps.Generation, bool]:
    """``spec_of``'s generation and ``urls``, again; ValueError for a spec this version cannot read."""
    import base64
    import io

    from PIL import Image

    try:
        d = json.loads(spec)
        if d.get("v") != SPEC_VERSION:
            raise ValueError(f"spec version {d.get('v')!r}, not {SPEC_VERSION}")
        key = {**d["key"], "loras": tuple((name, weight) for name, weight in d["key"]["loras"])}

        def image(b64: str | None) -> Any:
            if b64 is None:
                return None
            with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
                im.load()
                return im

        gen = steps.Generation(
            key=BatchKey(**key),
            prompt=d["prompt"],
            negative_prompt=d["negative_prompt"],
            n=d["n"],
            seed=d["seed"],
            init_image=image(d["init_image"]),
            mask_image=image(d["mask_image"]),
            inputs_digest=d["inputs_digest"],
            preview=d["preview"],
            output=ImageFormat(**d["output"]),
            principal=d["principal"],
            model=d.get("model"),  # not in the specs of replicas before it was kept
        )
        return gen, bool(d["urls"])
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"cannot read the job's request: {type(e).__name__}: {e}") from e
