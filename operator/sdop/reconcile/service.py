"""Converge one StableDiffusionService: render, apply, prune, and write the status.

Every trigger (create/update/resume, the resync timer, a Deployment event) goes through
``Reconciler``; what it did comes back as a ``Report`` (children written, Events worth
posting), so the kopf layer only records metrics and posts events. A failure worth
retrying raises ``RetryLater``; a rejection by the API server is reported in status.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from ..api import API_VERSION, KIND, SpecError, StableDiffusionService, load
from ..render import ClusterFacts, Ctx, render, required_apis
from ..render.workload import COMPONENT as SERVER_COMPONENT
from . import conditions as cond
from .children import SyncResult, apply_child, owned, ref, sync
from .discovery import Discovery
from .kube import Kube, KubeError, NotFound


class RetryLater(Exception):
    """A transient failure (outage, throttling, a lost race): run the reconcile again later."""


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Workload:
    problems: list[tuple[str, str]]
    autoscaler: tuple[bool, str, str] | None


@dataclass
class Report:
    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    invalid: bool = False
    events: list[Event] = field(default_factory=list)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, kube: Kube, discovery: Discovery, defaults: ClusterFacts):
        self.kube = kube
        self.discovery = discovery
        self.defaults = defaults  # the image defaults; optional APIs come from discovery

    async def facts(self) -> ClusterFacts:
        apis = await self.discovery.optional_apis()
        return ClusterFacts(
            optional_apis=apis,
            default_image_repository=self.defaults.default_image_repository,
            default_image_tag=self.defaults.default_image_tag,
        )

    async def converge(self, body: dict[str, Any], *, prune: bool) -> Report:
        """Make the cluster hold what the spec asks for; idempotent, safe to run again at any time."""
        report = Report()
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return report  # children go with it by garbage collection (owner references)
        generation = meta.get("generation", 1)
        previous = body.get("status") or {}
        try:
            cr = load(body)
        except SpecError as e:
            report.invalid = True
            new = cond.status(cond.Facts(generation=generation, spec_error=str(e)), previous, _now())
            await self._write_status(body, previous, new, report)
            return report
        facts = await self.facts()
        result = await sync(self.kube, body, render(cr, facts), set(facts.optional_apis), prune=prune)
        report.applied, report.pruned = result.applied, result.pruned
        if result.applied:
            report.events.append(Event("Normal", "Applied", ", ".join(result.applied)))
        if result.pruned:
            report.events.append(Event("Normal", "Pruned", ", ".join(result.pruned)))
        if result.retryable:
            # Every other child was still applied; this one is tried again soon.
            raise RetryLater("applying children: " + "; ".join(f"{r}: {e}" for r, e in result.retryable))
        dep = await self._read("apps/v1", "Deployment", meta["namespace"], meta["name"])
        workload = await self._workload(cr, facts, dep)
        new = self._status(cr, facts, dep, result.error(), result.conflicts, previous, workload)
        await self._write_status(body, previous, new, report)
        return report

    async def follow_deployment(self, body: dict[str, Any], dep: dict[str, Any]) -> Report:
        """The Deployment changed: re-apply it if it drifted, and refresh the status from it."""
        report = Report()
        meta = body["metadata"]
        try:
            cr = load(body)
        except SpecError:
            return report  # the change handlers own the InvalidSpec status
        facts = await self.facts()
        rendered = [o for o in render(cr, facts) if o["kind"] == "Deployment" and o["metadata"]["name"] == meta["name"]]
        desired = owned(body, rendered)[0]
        result = SyncResult()
        dep = await apply_child(self.kube, body, desired, result, live=dep) or dep
        if result.retryable:
            raise RetryLater(f"re-applying the Deployment: {result.error()}")
        if result.applied:
            report.applied.append(ref(desired))
            report.events.append(Event("Normal", "Applied", f"Deployment/{meta['name']} (drift repaired)"))
        previous = body.get("status") or {}
        apply_error, conflicts = _carried_problems(previous)
        workload = await self._workload(cr, facts, dep)
        new = self._status(cr, facts, dep, result.error() or apply_error, conflicts, previous, workload)
        await self._write_status(body, previous, new, report)
        return report

    async def owner_of(self, child: dict[str, Any]) -> dict[str, Any] | None:
        """The live StableDiffusionService that controls a child, if it still exists and is not going away."""
        meta = child.get("metadata", {})
        owner = next(
            (r for r in meta.get("ownerReferences") or [] if r.get("kind") == KIND and r.get("controller")), None
        )
        if owner is None:
            return None
        cr = await self._read(API_VERSION, KIND, meta["namespace"], owner["name"])
        if cr is None or cr["metadata"].get("uid") != owner.get("uid") or cr["metadata"].get("deletionTimestamp"):
            return None
        return cr

    async def _workload(self, cr: StableDiffusionService, facts: ClusterFacts, dep: dict[str, Any] | None) -> Workload:
        """What the pods, their ReplicaSets and the HPA say: read at every reconcile, so a stuck
        replica shows in status within one resync rather than after the progress deadline.
        A Deployment whose replicas are all updated and ready has nothing to report from its
        pods: then only the HPA is read (a no-op resync of a healthy service stays cheap)."""
        ns, name = cr.metadata.namespace, cr.metadata.name
        selector = Ctx(cr, facts).selector(SERVER_COMPONENT)
        try:
            pods: list[dict[str, Any]] = []
            replicasets: list[dict[str, Any]] = []
            if not cond.rolled_out(dep):
                pods = await self.kube.list("v1", "Pod", ns, selector)
                replicasets = await self.kube.list("apps/v1", "ReplicaSet", ns, selector)
            hpa = None
            if cr.spec.autoscaling.enabled and cr.spec.autoscaling.provider == "hpa":
                hpa = await self.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", ns, name)
        except KubeError as e:
            raise RetryLater(f"reading the workload: {e}") from e
        return Workload(cond.workload_problems(pods, replicasets), cond.autoscaler_verdict(hpa))

    async def _read(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.kube.get(api_version, kind, namespace, name)
        except KubeError as e:
            raise RetryLater(f"reading {kind}/{name}: {e}") from e

    def _status(
        self,
        cr: StableDiffusionService,
        facts: ClusterFacts,
        dep: dict[str, Any] | None,
        apply_error: str | None,
        conflicts: list[str],
        previous: dict[str, Any],
        workload: Workload,
    ) -> dict[str, Any]:
        s = cr.spec
        return cond.status(
            cond.Facts(
                generation=cr.metadata.generation,
                deployment=dep,
                apply_error=apply_error,
                conflicts=conflicts,
                problems=workload.problems,
                autoscaler=workload.autoscaler,
                min_replicas=s.replicas.min,
                endpoint=Ctx(cr, facts).endpoint,
                scale_to_zero=Ctx(cr, facts).scales_to_zero,
                model_revision=s.model.revision,
                missing_apis=[a for a in required_apis(cr) if a not in facts.optional_apis],
                optional_apis=sorted(facts.optional_apis),
            ),
            previous,
            _now(),
        )

    async def _write_status(
        self, body: dict[str, Any], previous: dict[str, Any], new: dict[str, Any], report: Report
    ) -> None:
        if cond.same(previous, new):
            return
        m = body["metadata"]
        try:
            await self.kube.patch_status(API_VERSION, KIND, m["namespace"], m["name"], new)
        except NotFound:
            return  # deleted meanwhile
        except KubeError as e:
            raise RetryLater(f"writing status: {e}") from e
        for type_, _old, now, reason in cond.transitions(previous, new):
            if type_ in ("Ready", "Degraded"):
                bad = (type_ == "Ready" and now != "True") or (type_ == "Degraded" and now == "True")
                message = next(c["message"] for c in new["conditions"] if c["type"] == type_)
                report.events.append(Event("Warning" if bad else "Normal", reason, f"{type_}={now}: {message}"))


def _carried_problems(previous: dict[str, Any]) -> tuple[str | None, list[str]]:
    """An ApplyFailed or Conflict from the last full reconcile stays until a full reconcile clears it."""
    for c in previous.get("conditions") or []:
        if c.get("type") == "Degraded" and c.get("status") == "True":
            if c.get("reason") == "ApplyFailed":
                return c.get("message"), []
            if c.get("reason") == "Conflict":
                return None, [str(c.get("message"))]
    return None, []
