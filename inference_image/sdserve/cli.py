"""The sdserve command: serve (default), drain (preStop hook), prefetch (cache Job)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import sys
import time
import urllib.request


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .lifecycle import start_drain
    from .middleware import RequestIdFilter
    from .settings import Settings

    overrides = {k: v for k, v in {"model": args.model, "port": args.port, "host": args.host}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # every record, uvicorn's and libraries' too
        handler.addFilter(RequestIdFilter())
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """SIGTERM: readiness false, new requests 503, queued work finishes, then exit."""

        draining_task = None
        interrupted = False

        def handle_exit(self, sig, frame):
            self.interrupted = self.interrupted or sig == signal.SIGINT
            if sig == signal.SIGTERM and self.draining_task is None and self.started:
                loop = asyncio.get_event_loop()
                self.draining_task = loop.create_task(self._drain_then_exit())
                return
            super().handle_exit(sig, frame)

        async def _drain_then_exit(self):
            await start_drain(app.state.sd)
            self.should_exit = True

    # One process per GPU: a second worker would load a second copy of the model.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_seconds) + 5,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        access_log=False,
    )
    server = DrainingServer(config)
    server.run()
    # Ctrl-C: 128 + SIGINT, as a shell expects. uvicorn raises the signal again once it has shut
    # down (a KeyboardInterrupt: main returns 130), but into the disposition it started with: one
    # started with SIGINT ignored (a background job of a non-interactive shell) would exit 0.
    return 130 if server.interrupted else 0


def _drain(args: argparse.Namespace) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{args.port}/admin/drain", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            print(r.read().decode())
    except Exception as e:  # noqa: BLE001 - a preStop hook must not fail the shutdown
        print(f"drain: {e}", file=sys.stderr)
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    kwargs = {"revision": args.revision, "token": os.environ.get("SDSERVE_HF_TOKEN") or None}
    if args.variant:
        # The variant's weights plus everything that is not a weight file.
        kwargs["allow_patterns"] = [f"*.{args.variant}.safetensors", "*.json", "*.txt", "*.model"]
    path = snapshot_download(args.model, **kwargs)
    if args.safety_checker:  # the content check's own repo (SDSERVE_SAFETY_CHECKER), whole
        snapshot_download(args.safety_checker, token=kwargs["token"])
    for lora in args.lora:  # REPO, or REPO@FILE: the weights the server loads (not the sample images)
        repo, _, weight_name = lora.partition("@")
        snapshot_download(repo, token=kwargs["token"], allow_patterns=[weight_name or "*.safetensors", "*.json"])
    done = json.dumps({"model": args.model, "revision": args.revision, "path": path})
    if args.marker:
        write_marker(pathlib.Path(args.marker), done)
    print(done)
    return 0


def write_marker(marker: pathlib.Path, content: str) -> None:
    """Atomically: a replica never sees a half-written marker."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(content)
    tmp.replace(marker)


def _wait_for(args: argparse.Namespace) -> int:
    """Init container of the replicas: wait until the prefetch Job's marker is there."""
    marker = pathlib.Path(args.path)
    deadline = time.monotonic() + args.timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            print(f"wait-for: {marker} did not appear in {args.timeout:.0f} s (is the prefetch Job failing?)")
            return 1
        time.sleep(args.interval)
    print(f"wait-for: {marker} is there: {marker.read_text().strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]  # `sdserve --model tiny --port 8000`
    p = argparse.ArgumentParser(prog="sdserve")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the HTTP server (settings from SDSERVE_* variables)")
    s.add_argument("--model", help="tiny, a Hugging Face id, a diffusers folder or a .safetensors file")
    s.add_argument("--port", type=int)
    s.add_argument("--host")
    s.set_defaults(func=_serve)
    d = sub.add_parser("drain", help="ask the local server to drain (preStop hook)")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--timeout", type=float, default=600)
    d.set_defaults(func=_drain)
    f = sub.add_parser("prefetch", help="download a model into the Hugging Face cache")
    f.add_argument("--model", required=True)
    f.add_argument("--revision", default="main")
    f.add_argument("--variant")
    f.add_argument("--safety-checker", help="a Hugging Face id of a safety checker to download too")
    f.add_argument(
        "--lora", action="append", default=[], help="a LoRA adapter's repo (REPO, or REPO@FILE) to download too"
    )
    f.add_argument("--marker", help="file written when the download is complete")
    f.set_defaults(func=_prefetch)
    w = sub.add_parser("wait-for", help="wait until a file exists (the prefetch marker)")
    w.add_argument("--path", required=True)
    w.add_argument("--timeout", type=float, default=1800)
    w.add_argument("--interval", type=float, default=2)
    w.set_defaults(func=_wait_for)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C (uvicorn re-raises SIGINT once it has shut down): no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
