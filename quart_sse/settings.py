"""The service's configuration: one pydantic-settings model, read once at start-up and passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .presence.webhooks import parse_targets

#: URL schemes REDIS_URL may use (redis-py: TCP, TLS, Unix socket).
REDIS_SCHEMES = ("redis", "rediss", "unix")

#: The secret shipped in .env.example; production refuses it.
EXAMPLE_SECRET = "change-me-this-is-the-example-secret-of-quart-sse"


class ConfigError(Exception):
    """A bad setting: the message is one line naming the variable."""


class Settings(BaseSettings):
    """Every environment variable the service reads (docs/configuration.md); `.env` fills the gaps."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False)

    app_name: str = Field("sse-service", description="Name of the service (container names, the first log line).")
    app_host: str = Field(
        "0.0.0.0", description="Address to listen on: 0.0.0.0 every interface, 127.0.0.1 this machine only.")
    app_port: int = Field(8080, ge=1, le=65535, description="Port the service listens on.")
    app_mode: Literal["debug", "production"] = Field(
        "debug", description="debug: text logs, detailed 401s, /demo/token; production: JSON logs, strict JWT_SECRET.")
    workers: int = Field(
        1, ge=1, le=64,
        description="Processes sharing the listening socket; above 1 needs Redis (in-process brokers do not share).")

    redis_url: str | None = Field(
        None, description="Redis URL: redis://, rediss:// (TLS) or unix:// (socket); wins over REDIS_HOST. "
        "Neither set: the in-process broker.")
    redis_host: str | None = Field(
        None, description="Redis host, used when REDIS_URL is unset (docker compose sets redis).")
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis port, used with REDIS_HOST.")
    redis_cluster: bool = Field(False, description="true: REDIS_URL names one node of a Redis Cluster.")

    jwt_secret: SecretStr = Field(
        description="Verifies HS* token signatures; production refuses under 32 bytes or the example's value.")
    jwt_algorithm: Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"] = Field(
        "HS256", description="The one algorithm tokens may use; RS*/ES* verify with JWT_PUBLIC_KEY.")
    jwt_public_key: str | None = Field(None, description="PEM public key, required for RS*/ES* algorithms.")
    jwt_leeway: int = Field(
        0, ge=0, le=300,
        description="Seconds of clock skew allowed on exp/nbf (iat is informational); a stream ends at exp plus this.")
    jwt_audience: str | None = Field(None, description="When set, tokens must carry this aud claim.")
    jwt_issuers: str = Field("", description="Comma-separated allow-list of iss (application ids); empty: any.")
    jwt_cookie_name: str = Field(
        "access_token_cookie", description="Cookie the token may be read from, after the header and query parameters.")
    jwt_max_bytes: int = Field(8192, ge=256, description="Longest token accepted, in bytes.")

    ping_interval: float = Field(30.0, gt=0, description="Seconds between keep-alive ping events on every stream.")
    sse_retry_ms: int = Field(
        3000, ge=0, description="The retry: announced to clients, in ms (a shutdown adds up to 10 s of jitter).")
    max_connections_per_user: int = Field(
        0, ge=0, description="Open streams per app and user across all instances (over it: 429); 0: no cap.")
    max_connections: int = Field(0, ge=0, description="Open streams on this instance (over it: 503); 0: no cap.")
    queue_max_events: int = Field(
        1000, ge=1, description="Events queued for one slow stream before it is disconnected.")
    queue_max_bytes: int = Field(
        1 << 20, ge=1024, description="Bytes queued for one slow stream before it is disconnected.")
    stream_handoff: bool = Field(
        True, description="true: once a plain HTTP/1.x stream has started, the hub owns its connection and Quart's "
        "and Hypercorn's per-request objects are freed (~30 KiB per stream); false: the response generator "
        "holds every stream to its end.")
    cors_origins: str = Field(
        "*", description="* (without credentials) or a comma-separated list of origins allowed with credentials.")
    history_size: int = Field(
        1000, ge=0, description="Events kept per user and per app broadcast for Last-Event-ID resume; 0: no history.")
    history_ttl: int = Field(3600, ge=0, description="Seconds an event stays in history; 0: no history.")
    registry_ttl: int = Field(30, ge=3, description="Seconds after which a dead instance's connections stop counting.")
    ticket_ttl: int = Field(30, ge=1, le=60, description="Lifetime of a POST /sse/ticket ticket, in seconds.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body accepted (over it: 413).")
    max_batch_bytes: int = Field(
        4 << 20, ge=1024, le=64 << 20,
        description="Largest body of a batch publish (POST /publish/{app} with a JSON array of up to 1000 events; "
        "over it: 413); at least MAX_BODY_BYTES. Every other body keeps MAX_BODY_BYTES.")
    listen_backlog: int = Field(
        65535, ge=128, le=1 << 20,
        description="Connections the kernel holds for the service before it accepts them (a reconnect storm "
        "arrives at once); the kernel caps it at net.core.somaxconn (4096 on recent Linux): raise that too.")
    graceful_timeout: float = Field(
        5.0, ge=0,
        description="Seconds a SIGTERM waits for open requests; keep a container's stop grace period above it.")
    presence_grace: float = Field(
        5.0, ge=0, le=3600, description="Seconds after a user's last stream closed before user.offline is sent (a "
        "stream opened within it sends nothing); a stream the server ends at shutdown adds SSE_RETRY_MS + 10 s.")
    webhook_url: str | None = Field(
        None, description="Where presence webhooks go: one http(s) URL for every app, or a JSON object of app id -> "
        'URL where "*" names the URL of the apps not listed; unset: no webhooks.')
    webhook_secret: SecretStr | None = Field(
        None, description="Key of the webhooks' HMAC-SHA256 X-Signature; required with WEBHOOK_URL (production: at "
        "least 32 bytes).")
    webhook_queue_max: int = Field(
        100_000, ge=1, description="Undelivered webhook events kept per app (in Redis, or in the process); beyond "
        "it the oldest are dropped, counted in sse_webhooks_failed{reason=queue_full}.")
    webhook_timeout: float = Field(5.0, gt=0, le=60, description="Seconds one webhook attempt may take.")
    webhook_retry_max: float = Field(
        60.0, gt=0, le=3600, description="Longest wait between two attempts of a failing webhook, in seconds (the "
        "wait doubles from 0.5 s; a receiver's Retry-After is honoured up to this).")
    webhook_concurrency: int = Field(
        16, ge=1, le=1000, description="Webhook requests in flight per instance (one per user at a time).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        None, description="DEBUG, INFO, WARNING or ERROR; unset: INFO.")

    @field_validator("jwt_secret")
    @classmethod
    def _secret_not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        """The schemes and syntax redis-py's `from_url` connects with; anything else would fail later, far from the
        setting (in a worker process, or at the first command).

        Only the scheme is echoed: the rest of the URL may carry a password.
        """
        if not v:
            return None
        scheme, sep, _ = v.partition("://")
        if not sep or scheme not in REDIS_SCHEMES:
            got = f"{scheme[:20]}://" if sep else "no scheme"
            raise ValueError(f"must start with redis://, rediss:// (TLS) or unix:// (got {got})")
        from redis.asyncio import ConnectionPool
        from redis.connection import parse_url  # the parser redis-py itself connects with: port, db, options

        try:
            parse_url(v)  # type: ignore[no-untyped-call]
        except ValueError as exc:  # its messages name the part (port, option), never the password
            raise ValueError(str(exc).rstrip(".")) from None
        try:  # a connection object, not a connection: an unknown option (`?socket_timout=5`) fails here, not later
            ConnectionPool.from_url(v).make_connection()  # type: ignore[no-untyped-call]
        except TypeError as exc:
            option = str(exc).rpartition("argument ")[2].strip("'")
            raise ValueError(f"unknown option {option!r} (redis-py's connection options)") from None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _production_secret(self) -> Settings:
        if self.app_mode == "production" and self.jwt_algorithm.startswith("HS"):
            secret = self.jwt_secret.get_secret_value()
            if len(secret.encode()) < 32 or secret == EXAMPLE_SECRET:
                raise ValueError("JWT_SECRET: production needs a secret of at least 32 bytes, not the example's")
        if self.max_batch_bytes < self.max_body_bytes:  # the batch route also takes a single event's body
            raise ValueError("MAX_BATCH_BYTES: must be at least MAX_BODY_BYTES")
        if self.workers > 1 and not self.redis_dsn:
            raise ValueError("WORKERS: more than one worker needs Redis (REDIS_URL or REDIS_HOST): the in-process "
                             "broker lives in one process, and each worker would see only its own streams")
        if self.redis_cluster and self.redis_url and self.redis_url.startswith("unix://"):
            raise ValueError("REDIS_CLUSTER: a Redis Cluster is reached over redis:// or rediss://, not unix://")
        if self.jwt_algorithm[:2] in ("RS", "ES") and not self.jwt_public_key:
            raise ValueError(f"JWT_PUBLIC_KEY: required for JWT_ALGORITHM={self.jwt_algorithm}")
        if self.jwt_algorithm[:2] in ("RS", "ES") and self.jwt_public_key:
            self.jwt_public_key = _check_public_key(self.jwt_algorithm, self.jwt_public_key)
        self._check_webhooks()
        return self

    def _check_webhooks(self) -> None:
        try:
            targets = parse_targets(self.webhook_url)
        except ValueError as exc:
            raise ValueError(f"WEBHOOK_URL: {exc}") from None
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        if targets and not secret:
            raise ValueError("WEBHOOK_SECRET: required when WEBHOOK_URL is set (it signs every webhook)")
        if targets and self.app_mode == "production" and len(secret.encode()) < 32:
            raise ValueError("WEBHOOK_SECRET: production needs a secret of at least 32 bytes")

    @property
    def debug(self) -> bool:
        return self.app_mode == "debug"

    @property
    def redis_dsn(self) -> str | None:
        """REDIS_URL wins over REDIS_HOST/REDIS_PORT; neither means the in-process broker."""
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/0"
        return None

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def issuer_allow_list(self) -> frozenset[str]:
        return frozenset(i.strip() for i in self.jwt_issuers.split(",") if i.strip())

    @property
    def history_enabled(self) -> bool:
        return self.history_size > 0 and self.history_ttl > 0  # either at 0 turns history off (docs/history.md)


def _check_public_key(algorithm: str, pem: str) -> str:
    """Load the key at start-up (a bad one would otherwise turn every request into a 401).

    A one-line PEM with literal `\\n` (as .env files and CI secrets often carry it) is accepted too.
    """
    if "\n" not in pem and "\\n" in pem:
        pem = pem.replace("\\n", "\n")
    if "PRIVATE KEY" in pem:
        raise ValueError("JWT_PUBLIC_KEY: this is a private key; the service needs the public key only")
    from jwt.algorithms import get_default_algorithms

    try:
        get_default_algorithms()[algorithm].prepare_key(pem)
    except Exception as exc:  # noqa: BLE001 - whatever the key loader raises, the setting is wrong
        raise ValueError(f"JWT_PUBLIC_KEY: not a valid public key for {algorithm} ({type(exc).__name__})") from None
    return pem


def load_settings(**overrides: object) -> Settings:
    """Read the environment (and `.env`); raise ConfigError with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]).upper()
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc and ":" in msg:  # model-level checks name their variable themselves
            raise ConfigError(f"invalid configuration: {msg}") from None
        raise ConfigError(f"invalid configuration: {loc or 'settings'}: {msg}") from None
