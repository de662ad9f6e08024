"""The benchmark's shape: the population, the load, the targets (one place to read them)."""

from __future__ import annotations

from pathlib import Path



BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"
MIX_LUA = BENCH / "mix.lua"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"

# -- population -----------------------------------------------------------------------------
N_KEYS = 100_000
N_TEAMS = 1_000
MASTER_KEY = "sk-bench-master"
MODEL_A, MODEL_B, UNKNOWN_MODEL = "bench-model", "bench-model-b", "gpt-unknown"
GROUP = "bench-group"            # access group of bench-model only
FUTURE, PAST = "2099-01-01T00:00:00+00:00", "2020-01-01T00:00:00+00:00"
PREFIX = "extauthz:"

# -- load shape -----------------------------------------------------------------------------
H2_PROCS = 12          # h2load processes per round, one body (key) each
H2_STREAMS = 2         # concurrent streams per h2load process: 24 checks in flight
REPS = 4               # repetitions; each runs one round per server, with new keys
ROUND_S = 2.0          # seconds per round: 8 s per server
WARMUP_S = 1.0
WRK_CONNECTIONS = 32
WRK_REPS = 3
WRK_S = 3              # seconds per wrk run: 9 s per Envoy
WRK_WARMUP_S = 1
MEMORY_CONCURRENCY = 64
# The warm sidecar's cache must hold every key and team (101,000 records) for the memory
# figure and for mix.lua, which walks all 100,000 keys: the default (100,000) would not.
WARM_CACHE_ENTRIES = 200_000
# One process each, like the floor: per-check CPU compares like with like.
WARM_ENV = {"EXTAUTHZ_CACHE_MAX_ENTRIES": str(WARM_CACHE_ENTRIES), "EXTAUTHZ_WORKERS": "1"}
COLD_ENV = {"EXTAUTHZ_CACHE_MAX_ENTRIES": "0", "EXTAUTHZ_WORKERS": "1"}
CACHE_SAMPLE = 2_000

TARGETS = {"warm_cpu_x_floor_max": 1.15, "envoy_sidecar_rps_x_noop_min": 0.9, "rss_mb_max": 150.0,
           "accounting_rps_x_without_min": 0.85, "budgeted_cpu_x_limited_max": 1.10,
           # instructions (callgrind): the sidecar's per warm allowed check over the floor's, and
           # the floor's over Envoy + sidecar's per request with accounting on (as a throughput)
           "instructions_x_floor_max": 1.15, "envoy_instructions_throughput_x_floor_min": 0.9}
