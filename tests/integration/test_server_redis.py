"""Result cache and shared rate limits with a real redis-server, and Redis going away."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

BODY = {"prompt": "redis cat", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 7}


def test_cache_hits_through_redis_and_survives_redis_going_away(start_server, redis_server):
    s = start_server(cache_type="redis", redis_url=redis_server.url)
    first = httpx.post(s.url + "/generate", json=BODY, timeout=60).json()
    assert first["cached"] is False
    keys = redis_server.client.keys("sdserve:result:*")
    assert len(keys) == 1 and redis_server.client.ttl(keys[0]) > 0
    second = httpx.post(s.url + "/generate", json=BODY, timeout=60).json()
    assert second["cached"] is True and second["images"] == first["images"]

    # A second replica sharing the Redis gets the hit without generating.
    other = start_server(cache_type="redis", redis_url=redis_server.url)
    assert httpx.post(other.url + "/generate", json=BODY, timeout=60).json()["cached"] is True
    assert other.metric("sdserve_images_generated_total") == 0

    redis_server.stop()
    r = httpx.post(s.url + "/generate", json={**BODY, "seed": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["cached"] is False
    assert s.metric("sdserve_cache_backend_up") == 0
    assert s.metric("sdserve_cache_errors_total") >= 1
    assert "redis cache unavailable, serving without the cache" in s.log()


def test_rate_limit_is_shared_by_replicas_through_redis(start_server, tmp_path):
    from sdtesting.procs import RedisProc

    redis = RedisProc(tmp_path)
    try:
        keys = tmp_path / "keys"
        keys.write_text("shared:key-shared\n")
        common = dict(
            cache_type="none",
            redis_url=redis.url,
            rate_limit_enabled=True,
            rate_limit_rps=0.1,
            rate_limit_burst=2,
            api_keys_file=keys,
        )
        a, b = start_server(**common), start_server(**common)
        h = {"Authorization": "Bearer key-shared"}
        body = {**BODY, "seed": None}
        assert httpx.post(a.url + "/generate", json=body, headers=h, timeout=60).status_code == 200
        assert httpx.post(b.url + "/generate", json=body, headers=h, timeout=60).status_code == 200
        third = httpx.post(a.url + "/generate", json=body, headers=h, timeout=60)
        assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
    finally:
        redis.stop()
