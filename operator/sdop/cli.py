"""The sdop command: render, crd, validate, operator."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from .api import SpecError, load
from .api.crd import crd_yaml
from .render import ClusterFacts, render


def _read_docs(path: str) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise SystemExit(f"sdop: cannot read {path}: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SystemExit(f"sdop: {path} is not valid YAML: {e}") from None
    if not docs:
        raise SystemExit(f"sdop: {path} holds no document")
    for d in docs:
        if not isinstance(d, dict):
            raise SystemExit(f"sdop: {path}: each document must be a mapping")
    return docs


def _dump(objs: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False, width=120) for o in objs)


def cmd_render(args: argparse.Namespace) -> int:
    facts = ClusterFacts(optional_apis=frozenset() if args.no_optional_apis else ClusterFacts().optional_apis)
    out = []
    for doc in _read_docs(args.file):
        try:
            out.extend(render(doc, facts))
        except SpecError as e:
            name = doc.get("metadata", {}).get("name", "?")
            for field, msg in e.problems:
                print(f"{args.file}: {name}: {field}: {msg}", file=sys.stderr)
            return 1
    sys.stdout.write(_dump(out))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for doc in _read_docs(args.file):
        name = (doc.get("metadata") or {}).get("name", "?")
        try:
            load(doc)
            print(f"{args.file}: {name}: valid")
        except SpecError as e:
            bad += 1
            for field, msg in e.problems:
                print(f"{args.file}: {name}: {field}: {msg}", file=sys.stderr)
    return 1 if bad else 0


def cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from .operator import run  # kopf is only needed here

    return run(verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdop", description="Stable Diffusion operator tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print the objects the operator would apply for a CR (like helm template)")
    r.add_argument("-f", "--file", required=True, help="CR YAML file, or - for stdin")
    r.add_argument(
        "--no-optional-apis", action="store_true", help="render as for a cluster without Prometheus Operator and KEDA"
    )
    r.set_defaults(func=cmd_render)
    v = sub.add_parser("validate", help="check CRs against the schema and the operator's rules")
    v.add_argument("-f", "--file", required=True, help="CR YAML file, or - for stdin")
    v.set_defaults(func=cmd_validate)
    c = sub.add_parser("crd", help="print the CustomResourceDefinition")
    c.set_defaults(func=cmd_crd)
    o = sub.add_parser("operator", help="run the operator (kopf) against the current cluster")
    o.add_argument("-v", "--verbose", action="store_true")
    o.set_defaults(func=cmd_operator)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
