"""The service's configuration: one pydantic-settings model, read once at start-up and passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The secret shipped in .env.example; production refuses it.
EXAMPLE_SECRET = "change-me-this-is-the-example-secret-of-quart-sse"


class ConfigError(Exception):
    """A bad setting: the message is one line naming the variable."""


class Settings(BaseSettings):
    """Every environment variable the service reads (CONTRACT §2); `.env` fills the gaps."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False)

    app_name: str = "sse-service"
    app_host: str = "0.0.0.0"
    app_port: int = Field(8080, ge=1, le=65535)
    app_mode: Literal["debug", "production"] = "debug"
    workers: int = Field(1, ge=1, le=64)

    redis_url: str | None = None
    redis_host: str | None = None
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_cluster: bool = False

    jwt_secret: SecretStr
    jwt_algorithm: Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"] = "HS256"
    jwt_public_key: str | None = None
    jwt_leeway: int = Field(0, ge=0, le=300)
    jwt_audience: str | None = None
    jwt_issuers: str = ""
    jwt_cookie_name: str = "access_token_cookie"
    jwt_max_bytes: int = Field(8192, ge=256)

    ping_interval: float = Field(30.0, gt=0)
    sse_retry_ms: int = Field(3000, ge=0)
    max_connections_per_user: int = Field(0, ge=0)
    max_connections: int = Field(0, ge=0)
    queue_max_events: int = Field(1000, ge=1)
    queue_max_bytes: int = Field(1 << 20, ge=1024)
    cors_origins: str = "*"
    history_size: int = Field(1000, ge=0)
    history_ttl: int = Field(3600, ge=0)
    registry_ttl: int = Field(30, ge=3)
    ticket_ttl: int = Field(30, ge=1, le=60)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    graceful_timeout: float = Field(5.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None

    @field_validator("jwt_secret")
    @classmethod
    def _secret_not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
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
        if self.jwt_algorithm[:2] in ("RS", "ES") and not self.jwt_public_key:
            raise ValueError(f"JWT_PUBLIC_KEY: required for JWT_ALGORITHM={self.jwt_algorithm}")
        return self

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
        return self.history_size > 0


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
