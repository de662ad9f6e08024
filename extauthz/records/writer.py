"""RedisWriter: the admin API's reads and atomic writes of keys, teams, users, team
members and runtime models, each a part of its own (records/admin_reads.py, key_writes.py,
team_writes.py, models.py) on the shared transaction machinery (records/write_base.py)."""

from __future__ import annotations

from extauthz.records.admin_reads import AdminReads
from extauthz.records.key_writes import KeyWrites
from extauthz.records.models import ModelWrites
from extauthz.records.team_writes import TeamWrites


class RedisWriter(AdminReads, KeyWrites, TeamWrites, ModelWrites):
    """Every admin read and write, through one client and one audit trail."""
