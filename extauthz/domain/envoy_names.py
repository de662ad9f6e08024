"""Every name that crosses between the sidecar and Envoy (its routes, its Lua filters
envoy/splice.lua and envoy/usage.lua, its access log): the request headers an allow sets,
their values, and the dynamic metadata keys the filters and the usage report read."""

from __future__ import annotations

# Set on every allow; Envoy routes on it (cluster_header). A client's own value never
# survives an allow, and a request without it matches no upstream route.
CLUSTER_HEADER = "x-extauthz-cluster"
# Envoy's dynamic forward proxy clusters: a runtime model (or a model a reload added) on a
# host the rendered config does not name goes there, Envoy making a cluster of its own for
# the host the allow sets as :authority (never the client's: the allow always sets it).
DYNAMIC_CLUSTERS = {"https": "extauthz_dynamic_https", "http": "extauthz_dynamic_http"}
# The body rewrite that Envoy's Lua filter applies (envoy/splice.lua): "-" for none, else the
# byte span of the body's "model" value and the provider-side name to put there. Set on
# every allow, so a client's own value never survives.
SPLICE_HEADER = "x-extauthz-splice"
NO_SPLICE = "-"
# Set on allows to AWS deployments only ("bedrock:us-east-1"): Envoy's signing filter for
# that service and region runs on it (and on nothing else, whatever host a route reaches).
SIGN_HEADER = "x-extauthz-sign"
# Set to "1" on allows whose usage is counted (callers with rate limits): Envoy's usage
# filter (envoy/usage.lua) runs on their responses only.
USAGE_HEADER = "x-extauthz-usage"
# Its values: a counted call; one that also holds an in-flight place (max_parallel_requests).
COUNTED, COUNTED_IN_FLIGHT = "1", "2"
# Headers only the gateway may set; Envoy's routes remove them before the provider too.
INTERNAL_HEADERS = (CLUSTER_HEADER, SPLICE_HEADER, SIGN_HEADER, USAGE_HEADER)
# An internal_user's request to the admin API, swapped to the master key: who it acts as
# (the user, and its teams as a JSON list). They only narrow the master key's power, and
# are stripped from client requests with the internal headers (but not by the admin route).
ACTING_USER_HEADER = "x-extauthz-acting-user"
ACTING_TEAMS_HEADER = "x-extauthz-acting-teams"
# Any JWT caller the check lets onto the admin API: its user and role (JSON), the actor
# the audit trail names (the request reaches the admin API with the master key).
ADMIN_ACTOR_HEADER = "x-extauthz-admin-actor"
ACTING_HEADERS = (ACTING_USER_HEADER, ACTING_TEAMS_HEADER, ADMIN_ACTOR_HEADER)
# An allow's usage id (usage/reports.py): new for every request, encoded apart from the
# memoized rest of the metadata (check/responses.py), into a template of its fixed length.
USAGE_ID = "usage_id"
USAGE_ID_LENGTH = 24
# "1" on a counted stream whose usage the gateway asked for and the client did not: Envoy's
# usage filter (envoy/usage.lua) takes what was added out of the stream.
USAGE_UNASKED = "usage_unasked"
# Where Envoy's JWT filter puts a verified token's claims, which the check reads.
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "jwt_payload"
