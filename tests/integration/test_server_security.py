"""Auth (API keys, JWT), per-key rate limit and the prompt blocklist on a real server."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from openai import AuthenticationError, OpenAI

pytestmark = pytest.mark.integration

BODY = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1}
SECRET = "test-shared-secret-with-enough-bytes-for-hs256"


@pytest.fixture(scope="module")
def secured(start_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    (d / "keys").write_text("# team keys\nalice:key-alice\nbob:key-bob\nkey-anon\n")
    (d / "jwt").write_text(SECRET)
    (d / "blocklist").write_text("forbidden\nre:bad\\s+thing\n")
    return start_server(
        api_keys_file=d / "keys",
        jwt_issuer="https://issuer.test/",
        jwt_audience="sd-api",
        jwt_key_file=d / "jwt",
        jwt_algorithms="HS256",
        rate_limit_enabled=True,
        rate_limit_rps=0.2,
        rate_limit_burst=3,
        blocklist_file=d / "blocklist",
    )


def post(server, headers=None, **body):
    return httpx.post(server.url + "/generate", json={**BODY, **body}, headers=headers or {}, timeout=60)


def token(aud="sd-api", iss="https://issuer.test/", exp=300, sub="carol"):
    return jwt.encode({"sub": sub, "aud": aud, "iss": iss, "exp": int(time.time()) + exp}, SECRET, algorithm="HS256")


def test_missing_credentials_is_401_with_clear_body(secured):
    r = post(secured)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_credentials"


def test_wrong_api_key_is_401(secured):
    r = post(secured, {"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(secured, {"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_authorization_header"


def test_api_key_by_bearer_or_header_is_accepted(secured):
    assert post(secured, {"Authorization": "Bearer key-anon"}).status_code == 200
    assert post(secured, {"X-API-Key": "key-anon"}).status_code == 200


def test_jwt_valid_wrong_audience_and_expired(secured):
    assert post(secured, {"Authorization": f"Bearer {token(sub='jwt-ok')}"}).status_code == 200
    r = post(secured, {"Authorization": f"Bearer {token(aud='other-api', sub='jwt-aud')}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "token_not_for_this_service"
    r = post(secured, {"Authorization": f"Bearer {token(exp=-60, sub='jwt-exp')}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    bad = jwt.encode(
        {"sub": "x", "aud": "sd-api", "iss": "https://issuer.test/", "exp": int(time.time()) + 60},
        "another-secret-of-enough-length-xx",
        algorithm="HS256",
    )
    assert post(secured, {"Authorization": f"Bearer {bad}"}).json()["error"]["code"] == "invalid_token"


def test_openai_sdk_sends_its_api_key_as_bearer(secured):
    ok = OpenAI(base_url=secured.url + "/v1", api_key="key-bob")
    assert ok.models.list().data[0].id == "tiny"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=secured.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_rate_limit_per_key_is_429_with_retry_after(secured):
    alice = {"Authorization": "Bearer key-alice"}
    statuses = [post(secured, alice).status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    r = post(secured, alice)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limited"
    # Another key has its own bucket.
    assert post(secured, {"Authorization": f"Bearer {token(sub='dave')}"}).status_code == 200
    assert secured.metric("sdserve_rate_limited_total") >= 2


def test_blocklist_words_and_patterns_are_400_with_reason(secured):
    h = {"Authorization": f"Bearer {token(sub='erin')}"}
    before = secured.metric("sdserve_prompts_rejected_total", reason="blocked_word")
    r = post(secured, h, prompt="a FORBIDDEN castle")
    assert r.status_code == 400 and r.json()["error"]["code"] == "blocked_word"
    assert secured.metric("sdserve_prompts_rejected_total", reason="blocked_word") == before + 1
    h = {"Authorization": f"Bearer {token(sub='frank')}"}
    r = post(secured, h, prompt="ok", negative_prompt="a bad   thing")
    assert r.status_code == 400 and r.json()["error"]["code"] == "blocked_pattern"
    # Substrings of other words are not blocked.
    h = {"Authorization": f"Bearer {token(sub='gina')}"}
    assert post(secured, h, prompt="unforbiddenness").status_code == 200


def test_jwt_rs256_via_jwks_endpoint(start_server):
    """RS256 tokens checked against keys fetched from a JWKS URL (served on loopback)."""
    import http.server
    import json
    import threading

    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    from sdtesting.procs import free_port

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    body = json.dumps({"keys": [jwk]}).encode()

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Jwks)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        s = start_server(
            jwt_issuer="https://idp.test/",
            jwt_audience="sd",
            jwt_jwks_url=f"http://127.0.0.1:{port}/jwks.json",
            jwt_algorithms="RS256",
        )
        claims = {"sub": "svc", "aud": "sd", "iss": "https://idp.test/", "exp": int(time.time()) + 60}
        good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
        assert post(s, {"Authorization": f"Bearer {good}"}).status_code == 200
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})
        r = post(s, {"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    finally:
        httpd.shutdown()
