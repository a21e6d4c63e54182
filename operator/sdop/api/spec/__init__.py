"""The StableDiffusionService spec, defined once.

The CRD (``sdop crd``), the defaults, the CLI's validation and the operator's parsing all
come from these models. Cross-field rules are written twice on purpose: as a pydantic
validator (what the CLI and the operator run) and as a CEL rule in the CRD (what the API
server runs); ``tests/unit/test_crd.py`` evaluates both on the same CRs so they cannot drift.

One module per part of the spec: ``model``, ``workload`` (replicas, GPUs, scaling, rollout),
``serving`` (batching, limits, defaults, server tuning, safety), ``storage`` (result cache,
object storage), ``access`` (auth, rate limits, webhooks), ``network``, ``monitoring``; pieces
they share in ``common``; the whole spec and its cross-field rules in ``service``.
"""

from .service import StableDiffusionServiceSpec
from .workload import DEFAULT_IMAGE_REPOSITORY, DEFAULT_IMAGE_TAG

__all__ = ["DEFAULT_IMAGE_REPOSITORY", "DEFAULT_IMAGE_TAG", "StableDiffusionServiceSpec"]
