"""Async jobs: ``POST /v1/jobs`` runs a generation in the background and answers 202 at once;
``GET /v1/jobs/{id}`` gives its status, progress (step i of n) and result; ``DELETE`` cancels it
(a queued one at once, a running one at the next step under step batching); ``/events``
streams progress as server-sent events; a webhook, signed, reports the end.

Records live in Redis when the server has one (SDSERVE_CACHE_TYPE=redis), so any replica
answers for any job and a cancel reaches the replica running it (it reads the record once a
second); in memory otherwise. The replica running a job renews a lease on its record while
it runs: a record whose lease ran out (the replica died or restarted) reads as ``failed``,
so no job is left running forever or silently lost. A job belongs to the principal that made
it: another principal gets 404.

A replica that shuts down (a rolling update, a scale-down) finishes what it has queued and
running; with Redis it hands the jobs still waiting for room (and, when its drain runs out of
time, those still queued and those running that would not end in the seconds it has left,
which start again there) to the other replicas: their
requests go to the store (``offer``), and any ready replica with room takes them up, oldest
first (``take``), under the same id, so clients polling, streaming or waiting for a webhook
see the job go on. One that no replica takes up within SDSERVE_JOB_HANDOFF_SECONDS reads as
failed (``replica_lost``); without Redis there is no other replica, and it fails with
``draining`` at once. A replica that dies instead (killed, its node lost) hands nothing off:
with Redis every replica looks for jobs whose lease lapsed (``lapsed``) every few seconds; one
that never started is offered again (its request was stored with it), and so is one that was
running, to start again from its first step, once (``MAX_LOST_RUNS``): one whose second
replica dies under it, or already given to ``MAX_ATTEMPTS`` replicas, fails with
``replica_lost``, its webhook called, so a client waiting only for the webhook hears of it too.

Webhooks (``webhook``) go only to allowed hosts, signed, retried with backoff, at least once:
an ended job's record says its webhook is due until it is delivered or given up, under a
lease of the replica delivering it, and with Redis a replica finds a lapsed one (its
deliverer died or shut down) as it finds a lapsed job, and delivers it.

The parts: ``record`` (a job's record), ``store`` and ``redisstore`` (where records live),
``spec`` (a job's request, stored for another replica to run), ``webhook``, and ``service``
(``Jobs``: accepting, running, handing off and taking up jobs).
"""

from .record import TERMINAL, JobRecord
from .service import Jobs
from .store import make_store
from .webhook import check_webhook

__all__ = ["TERMINAL", "JobRecord", "Jobs", "check_webhook", "make_store"]
