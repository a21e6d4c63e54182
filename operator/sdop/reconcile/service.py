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

from ..api import API_VERSION, KIND, SpecError, StableDiffusionService, StableDiffusionServiceStatus, load
from ..api.status import CanaryStatus, ModelStatus
from ..render import ClusterFacts, Ctx, render, required_apis
from ..render import rollout as render_rollout
from ..render.workload import COMPONENT as SERVER_COMPONENT
from ..render.workload import TRACK_LABEL
from . import conditions as cond
from . import prometheus, rollout
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
    pods: list[dict[str, Any]] = field(default_factory=list)


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
        # A canary kept out by status (not by a spec change, which prunes anyway) is pruned by
        # every trigger, so its Deployment goes even when the verdict came from another path.
        prune = prune or (cr.spec.canary is not None and render_rollout.plan(cr).canary is None)
        # A rollout verdict that changes what is rendered (a failed model rolled back, a canary
        # that became ready and now gets its weight) is written to status first, so it
        # survives a restart, then applied in a second pass.
        for attempt in range(2):
            rendered = render(cr, facts)
            result = await sync(self.kube, body, rendered, set(facts.optional_apis), prune=prune)
            report.applied += result.applied
            report.pruned += result.pruned
            if result.retryable:
                # Every other child was still applied; this one is tried again soon.
                raise RetryLater("applying children: " + "; ".join(f"{r}: {e}" for r, e in result.retryable))
            dep = await self._read("apps/v1", "Deployment", meta["namespace"], meta["name"])
            workload, verdict = await self._look(cr, facts, dep)
            new = self._status(cr, facts, dep, result.error(), result.conflicts, previous, workload, verdict)
            after = {**body, "status": {**previous, **new}}
            if attempt == 1 or render(load(after), facts) == rendered:
                break
            await self._write_status(body, previous, new, report)
            body, previous, cr = after, after["status"], load(after)
            prune = True  # what the verdict took out (a failed canary) goes, whatever the trigger
        if report.applied:
            report.events.append(Event("Normal", "Applied", ", ".join(dict.fromkeys(report.applied))))
        if report.pruned:
            report.events.append(Event("Normal", "Pruned", ", ".join(dict.fromkeys(report.pruned))))
        await self._write_status(body, previous, new, report)
        return report

    async def follow_deployment(self, body: dict[str, Any], dep: dict[str, Any]) -> Report:
        """The Deployment changed: re-apply it if it drifted, and refresh the status from it."""
        report = Report()
        meta = body["metadata"]
        if dep["metadata"]["name"] != meta["name"]:
            # The canary's Deployment: its verdict (ready, failed) can change the route, so it
            # goes through the whole reconcile.
            return await self.converge(body, prune=False)
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
        workload, verdict = await self._look(cr, facts, dep)
        new = self._status(cr, facts, dep, result.error() or apply_error, conflicts, previous, workload, verdict)
        if verdict.new_failures:
            # A rollback changes what is rendered: the whole reconcile applies it.
            await self._write_status(body, previous, new, report)
            return await self.converge({**body, "status": {**previous, **new}}, prune=True)
        await self._write_status(body, previous, new, report)
        return report

    @staticmethod
    def owner_of(child: dict[str, Any]) -> dict[str, Any] | None:
        """The StableDiffusionService that controls a child, as a reference (apiVersion, kind,
        namespace, name, uid): ``current`` reads it."""
        meta = child.get("metadata", {})
        owner = next(
            (r for r in meta.get("ownerReferences") or [] if r.get("kind") == KIND and r.get("controller")), None
        )
        if owner is None:
            return None
        ref_meta = {"namespace": meta["namespace"], "name": owner["name"], "uid": owner.get("uid")}
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": ref_meta}

    async def current(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The service as the API server holds it now, if it is still the same object (same
        uid) and not going away."""
        meta = body["metadata"]
        cr = await self._read(API_VERSION, KIND, meta["namespace"], meta["name"])
        if cr is None or cr["metadata"].get("uid") != meta.get("uid") or cr["metadata"].get("deletionTimestamp"):
            return None
        return cr

    async def _look(
        self, cr: StableDiffusionService, facts: ClusterFacts, dep: dict[str, Any] | None
    ) -> tuple[Workload, rollout.Verdict]:
        """The stable workload's state, and the rollout verdict on both tracks."""
        ns = cr.metadata.namespace
        plan = render_rollout.plan(cr)
        workload = await self._workload(cr, facts, dep, "stable")
        canary = rollout.Track(None)
        if cr.spec.canary is not None and plan.canary is not None:
            cdep = await self._read("apps/v1", "Deployment", ns, Ctx(cr, facts, track="canary").workload_name)
            canary = rollout.Track(cdep, (await self._workload(cr, facts, cdep, "canary")).pods)
        stable = rollout.Track(dep, workload.pods)
        gateway = Ctx(cr, facts).gateway_routing
        errors = None
        if cr.spec.rollout.max_error_ratio is not None and canary.ready >= 1:
            errors = await prometheus.canary_errors(
                cr.spec.autoscaling.prometheus_address, ns, cr.metadata.name, cr.spec.rollout.error_ratio_window
            )
        verdict = rollout.judge(cr, plan, stable, canary, gateway=gateway, now=_now(), canary_errors=errors)
        return workload, verdict

    async def _workload(
        self, cr: StableDiffusionService, facts: ClusterFacts, dep: dict[str, Any] | None, track: str
    ) -> Workload:
        """What the pods, their ReplicaSets and the HPA say: read at every reconcile, so a stuck
        replica shows in status within one resync rather than after the progress deadline.
        A Deployment whose replicas are all updated and ready has nothing to report from its
        pods: then only the HPA is read (a no-op resync of a healthy service stays cheap).
        Both tracks' pods match the stable selector: each track keeps its own (TRACK_LABEL)."""
        ns, name = cr.metadata.namespace, cr.metadata.name
        selector = Ctx(cr, facts).selector(SERVER_COMPONENT)
        if track == "canary":
            selector[TRACK_LABEL] = "canary"

        def mine(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [o for o in objs if (o["metadata"].get("labels") or {}).get(TRACK_LABEL, "stable") == track]

        try:
            pods: list[dict[str, Any]] = []
            replicasets: list[dict[str, Any]] = []
            if dep is not None and not cond.rolled_out(dep):
                pods = mine(await self.kube.list("v1", "Pod", ns, selector))
                replicasets = mine(await self.kube.list("apps/v1", "ReplicaSet", ns, selector))
            hpa = None
            if track == "stable" and cr.spec.autoscaling.enabled and cr.spec.autoscaling.provider == "hpa":
                hpa = await self.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", ns, name)
        except KubeError as e:
            raise RetryLater(f"reading the workload: {e}") from e
        return Workload(cond.workload_problems(pods, replicasets), cond.autoscaler_verdict(hpa), pods)

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
        verdict: rollout.Verdict,
    ) -> dict[str, Any]:
        s = cr.spec
        # The status after this verdict: what the next render will serve.
        seen = (cr.status or StableDiffusionServiceStatus()).model_copy(
            update={
                "model": ModelStatus.model_validate(verdict.model),
                "canary": CanaryStatus.model_validate(verdict.canary) if verdict.canary else None,
            }
        )
        plan = render_rollout.plan(cr.model_copy(update={"status": seen}))
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
                model_revision=plan.stable.revision,
                rolled_back=rollout.rolled_back_message(plan),
                model=verdict.model,
                canary=verdict.canary,
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
