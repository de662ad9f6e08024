"""How the sidecar reaches Redis: every client and pool (the store's, the invalidation's)
is built from one ``RedisTarget``, made from the settings at start-up: the URL
(``redis://``, ``rediss://`` for TLS, ``unix://``), the ACL user and password (in the URL,
or ``redis_username`` / ``redis_password`` (``os.environ/NAME`` allowed) /
``redis_password_file`` for a mounted secret), and TLS (``redis_tls_ca_file``, a client
certificate and key, hostname verification on unless turned off), and the mode:
standalone, sentinel (the primary the sentinels name) or cluster (a Redis Cluster, found
from seed nodes; its clients follow the slots as they move and fail over).

A setting that could not do what it says is refused at start-up: TLS files with a URL
that is not ``rediss://`` (the operator would believe the link encrypted), a password
given twice, a certificate without its key, an unreadable file. ``describe`` names the
target for logs and ``check-config``; no password is ever in it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SCHEMES = ("redis", "rediss", "unix")
CREDENTIAL_PARAMS = ("username", "password")  # query parameters redis-py reads as credentials


class UnusableTarget(ValueError):
    """Settings that do not make a Redis connection that does what they say."""


@dataclass(frozen=True)
class RedisTarget:
    url: str                                  # without credentials
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True
    mode: str = "standalone"
    sentinels: tuple[tuple[str, int], ...] = ()  # sentinel mode: where to ask for the primary
    master: str = "mymaster"
    sentinel_password: str | None = field(default=None, repr=False)
    cluster_nodes: tuple[tuple[str, int], ...] = ()  # cluster mode: the seeds (the URL's host first)

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")

    def options(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's ``from_url`` (the URL carries no credentials)."""
        found: dict[str, Any] = {}
        if self.username is not None:
            found["username"] = self.username
        if self.password is not None:
            found["password"] = self.password
        if self.tls:
            found.update(ssl_cert_reqs="required", ssl_check_hostname=self.verify_hostname,
                         ssl_ca_certs=self.ca_file, ssl_certfile=self.cert_file, ssl_keyfile=self.key_file)
        return found

    @property
    def endpoint(self) -> str:
        """What metrics and readiness name: the URL, or the primary's name and its sentinels."""
        if self.mode == "sentinel":
            return f"sentinel {self.master} via " + ",".join(f"{h}:{p}" for h, p in self.sentinels)
        if self.cluster:
            return "cluster via " + ",".join(f"{h}:{p}" for h, p in self.cluster_nodes)
        return self.url

    @property
    def db(self) -> int:
        path = urlsplit(self.url).path.strip("/")
        return int(path) if path.isdigit() else 0

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A client of the primary (in sentinel mode, whichever the sentinels name now: its
        connections follow a promotion; in cluster mode, each command goes to its slot's
        primary, and the slot map is read again when a slot moves or a primary fails)."""
        if self.mode == "sentinel":
            return self._sentinel().master_for(self.master, **kwargs)
        if self.cluster:
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.cluster_nodes],  # type: ignore[return-value]
                                ssl=self.tls, **self.options(), **kwargs)
        return aioredis.Redis.from_url(self.url, **self.options(), **kwargs)

    def pool(self, **kwargs: Any) -> ConnectionPool:
        """A connection pool of the primary, for connections used one by one (invalidation).
        (In cluster mode there is one per node: ``node_pool``.)"""
        if self.mode == "sentinel":
            return SentinelConnectionPool(self.master, self._sentinel(), **kwargs)
        if self.cluster:
            host, port = self.cluster_nodes[0]
            return self.node_pool(host, port, **kwargs)
        return ConnectionPool.from_url(self.url, **self.options(), **kwargs)

    def node_pool(self, host: str, port: int, **kwargs: Any) -> ConnectionPool:
        """A connection pool of one node (a cluster's primary), with the target's credentials and TLS."""
        if self.tls:
            kwargs["connection_class"] = SSLConnection
        return ConnectionPool(host=host, port=port, **self.options(), **kwargs)

    def node_client(self, host: str, port: int, **kwargs: Any) -> aioredis.Redis:
        """A plain client of one node: a cluster's transactions (WATCH/MULTI) run on the
        primary of their slot."""
        return aioredis.Redis(connection_pool=self.node_pool(host, port, **kwargs))

    def _sentinel(self) -> Sentinel:
        asked: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
        if self.sentinel_password is not None:
            asked["password"] = self.sentinel_password
        if self.tls:
            asked.update({k: v for k, v in self.options().items() if k.startswith("ssl_")}, ssl=True)
        return Sentinel(list(self.sentinels), sentinel_kwargs=asked, db=self.db, ssl=self.tls, **self.options())

    def describe(self) -> str:
        parts = [self.endpoint if self.mode != "standalone" else f"standalone {self.url}"]
        if self.username is not None or self.password is not None:
            parts.append(f"user {self.username or 'default'} with a password" if self.password is not None
                         else f"user {self.username}")
        if self.tls:
            tls = [f"CA {self.ca_file}" if self.ca_file else "system CAs",
                   "hostname verified" if self.verify_hostname else "hostname NOT verified"]
            if self.cert_file:
                tls.append(f"client certificate {self.cert_file}")
            parts.append("TLS (" + ", ".join(tls) + ")")
        return "; ".join(parts)


def target(settings: Any) -> RedisTarget:
    """The Redis target the settings name; UnusableTarget says why there is none."""
    parts, in_url = _without_credentials(settings.redis_url)
    if parts.scheme not in SCHEMES:
        raise UnusableTarget(f"redis_url must start with redis://, rediss:// or unix://, got {parts.scheme!r}")
    username = in_url.get("username") or settings.redis_username or None
    if in_url.get("username") and settings.redis_username and in_url["username"] != settings.redis_username:
        raise UnusableTarget("redis_url and redis_username name different users")
    given = [p for p in (in_url.get("password"), settings.redis_password or None,
                         _read_secret(settings.redis_password_file) if settings.redis_password_file else None)
             if p is not None]
    if len(given) > 1:
        raise UnusableTarget("the Redis password is given more than once (redis_url, redis_password, "
                             "redis_password_file): give it once")
    tls_files = {"redis_tls_ca_file": settings.redis_tls_ca_file, "redis_tls_cert_file": settings.redis_tls_cert_file,
                 "redis_tls_key_file": settings.redis_tls_key_file}
    named = [name for name, path in tls_files.items() if path]
    if named and parts.scheme != "rediss":
        raise UnusableTarget(f"{', '.join(named)} set, but redis_url is not rediss://: the connection would not "
                             "use TLS")
    if bool(settings.redis_tls_cert_file) != bool(settings.redis_tls_key_file):
        raise UnusableTarget("redis_tls_cert_file and redis_tls_key_file go together")
    for name in named:
        if not os.access(tls_files[name], os.R_OK):
            raise UnusableTarget(f"{name} {tls_files[name]!r} cannot be read")
    sentinels: tuple[tuple[str, int], ...] = ()
    if settings.redis_mode == "sentinel":
        if parts.scheme == "unix" or not settings.redis_sentinels:
            raise UnusableTarget("redis_mode sentinel needs redis_sentinels (host:port, ...) and a redis:// or "
                                 "rediss:// redis_url (its scheme, credentials and database)")
        sentinels = tuple(_host_port(s) for s in settings.redis_sentinels)
    elif settings.redis_sentinels:
        raise UnusableTarget("redis_sentinels set, but redis_mode is not sentinel: they would not be used")
    seeds: tuple[tuple[str, int], ...] = ()
    if settings.redis_mode == "cluster":
        if parts.scheme == "unix" or not parts.hostname:
            raise UnusableTarget("redis_mode cluster needs a redis:// or rediss:// redis_url naming one of its nodes")
        if parts.path.strip("/") not in ("", "0"):
            raise UnusableTarget("a Redis Cluster has only database 0: drop the database from redis_url")
        prefix = getattr(settings, "key_prefix", "extauthz:")
        if not prefix:
            raise UnusableTarget("key_prefix is empty: in a Redis Cluster the records' hash tag is the prefix; "
                                 "keep extauthz: or choose another")
        if "{" in prefix or "}" in prefix:
            raise UnusableTarget(f"key_prefix {prefix!r} holds a brace: in a Redis Cluster it would decide the hash "
                                 "slot of every key; choose one without { and }")
        seeds = tuple(dict.fromkeys([(parts.hostname, parts.port or 6379),
                                     *(_host_port(s, "redis_cluster_nodes") for s in settings.redis_cluster_nodes)]))
    elif settings.redis_cluster_nodes:
        raise UnusableTarget("redis_cluster_nodes set, but redis_mode is not cluster: they would not be used")
    return RedisTarget(_url(parts), username, given[0] if given else None,
                       settings.redis_tls_ca_file or None, settings.redis_tls_cert_file or None,
                       settings.redis_tls_key_file or None, settings.redis_tls_verify_hostname,
                       settings.redis_mode, sentinels, settings.redis_sentinel_master,
                       settings.redis_sentinel_password or None, seeds)


def _userinfo(raw: str) -> tuple[str, dict[str, str]]:
    """The URL without the user information before its host, and the user and password it
    held (percent-decoded, as redis-py reads them). It ends at the last '@': a password
    pasted in unencoded may hold '/', '?', '#' or '@', which would otherwise cut the URL
    elsewhere and leave the password where a host or a path is shown."""
    scheme, sep, rest = raw.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return raw, {}
    user, colon, password = rest[:at].partition(":")
    found = {"username": unquote(user)} if user else {}
    if colon:
        found["password"] = unquote(password)
    return f"{scheme}://{rest[at + 1:]}", found


def _without_credentials(raw: str) -> tuple[SplitResult, dict[str, str]]:
    """The URL without its user and password, wherever it carries them: before the host, or
    in the query (redis-py reads ``?password=`` too); and what it carried."""
    bare, found = _userinfo(raw)
    parts = urlsplit(bare)
    query = parse_qsl(parts.query, keep_blank_values=True)
    found.update((k, v) for k, v in query if k in CREDENTIAL_PARAMS)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    return parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""),
                          query=urlencode([(k, v) for k, v in query if k not in CREDENTIAL_PARAMS])), found


def redacted(raw: str) -> str:
    """A Redis URL as a log or an error may show it."""
    try:
        return _url(_without_credentials(raw)[0])
    except ValueError:
        return "<an unreadable URL>"


def _url(parts: SplitResult) -> str:
    if parts.scheme == "unix":  # (urlunsplit would drop the empty authority: unix:/path)
        return f"unix://{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return urlunsplit(parts)


HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")


def _host_port(text: str, setting: str = "redis_sentinels") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        # (not echoed: a URL with a password given by mistake would be logged)
        raise UnusableTarget(f"{setting}: an entry is not host:port (a name or address and a port, no scheme, "
                             "user or password)")
    return host.strip("[]"), int(port)


def _read_secret(path: str) -> str:
    """A mounted secret: the file's text without its trailing newline."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UnusableTarget(f"redis_password_file {path!r} cannot be read: {type(e).__name__}") from None
    if not value:
        raise UnusableTarget(f"redis_password_file {path!r} is empty")
    return value
