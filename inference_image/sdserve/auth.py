"""Authentication: API keys from a mounted Secret and JWTs (issuer, audience, key or JWKS).

Clients send ``Authorization: Bearer <key or token>`` (what the OpenAI SDK sends) or
``X-API-Key``. The result is the principal the rate limiter counts against.
Missing or invalid credentials: 401. A valid token for another issuer or audience: 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass

from . import metrics
from .watched import WatchedFile

log = logging.getLogger("sdserve.auth")


@dataclass
class AuthError(Exception):
    status: int
    code: str
    message: str


def _parse_keys(text: str) -> dict[str, str]:
    """key -> name. Lines are 'name:key' or just 'key'; '#' starts a comment."""
    keys: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep:
            key, name = name, "key-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        keys[key.strip()] = name.strip()
    return keys


class Authenticator:
    def __init__(self, settings):
        #: With a keys file, key authentication is on whatever it holds: a Secret emptied of its
        #: keys refuses every key, it does not open the API. Rotated keys apply within seconds.
        self._keys = WatchedFile(settings.api_keys_file, _parse_keys, "API keys") if settings.api_keys_file else None
        if self._keys is not None and not self._keys.current():
            log.warning("%s holds no API key: every key is refused", settings.api_keys_file)
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.algorithms = settings.jwt_algorithm_list
        self._jwt_key = WatchedFile(settings.jwt_key_file, str.strip, "JWT key") if settings.jwt_key_file else None
        self._jwks = None
        if settings.jwt_jwks_url:
            import jwt

            self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=600, timeout=5)

    @property
    def enabled(self) -> bool:
        return self._keys is not None or bool(self.issuer)

    def _fail(self, status: int, code: str, message: str) -> AuthError:
        metrics.AUTH_FAILURES.labels(code).inc()
        return AuthError(status, code, message)

    async def authenticate(self, authorization: str | None, x_api_key: str | None) -> str:
        """The principal's name; raises AuthError."""
        if not self.enabled:
            return "anonymous"
        credential = x_api_key
        if not credential and authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise self._fail(
                    401, "invalid_authorization_header", "Authorization must be 'Bearer <API key or token>'"
                )
            credential = value.strip()
        if not credential:
            raise self._fail(401, "missing_credentials", "send an API key or token: Authorization: Bearer <key>")
        for key, name in (self._keys.current() if self._keys else {}).items():
            if hmac.compare_digest(key.encode(), credential.encode()):
                return name
        if self.issuer and credential.count(".") == 2:
            return await self._verify_jwt(credential)
        raise self._fail(401, "invalid_api_key", "the API key or token is not valid")

    async def _verify_jwt(self, token: str) -> str:
        import jwt

        try:
            if self._jwks is not None:
                signing = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
                key = signing.key
            else:
                key = self._jwt_key.current() if self._jwt_key else None
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as e:
            raise self._fail(403, "token_not_for_this_service", f"token rejected: {e}") from None
        except jwt.ExpiredSignatureError:
            raise self._fail(401, "token_expired", "the token has expired") from None
        except jwt.PyJWTError as e:
            raise self._fail(401, "invalid_token", f"the token is not valid: {e}") from None
        return f"jwt:{claims.get('sub', 'unknown')}"
