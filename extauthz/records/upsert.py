"""Records a JWT's claims create on first sight, as LiteLLM's ``team_id_upsert`` and
``user_id_upsert`` do. The check path writes here only when a read found nothing; the
new record then reaches every replica's cache through the usual invalidation.

What is created grants nothing by itself: a team with ``no-default-models`` (an admin
grants its models with /team/update), a user with the ``internal_user_viewer`` role (a
key it is given reads on the admin API, nothing more, until an admin changes the role).
"""

from __future__ import annotations

from extauthz.domain.model_names import NO_DEFAULT_MODELS
from extauthz.domain.record import TeamRecord, new_team_doc, new_user_doc
from extauthz.records.audit import Actor, Note
from extauthz.records.store import RecordReader
from extauthz.records.writer import RedisWriter


class Upserts:
    def __init__(self, reader: RecordReader, writer: RedisWriter) -> None:
        self.reader = reader    # the cached reader: a user seen before costs no round trip
        # The audit trail names the check path (the token's claims) as the author.
        self.team_writer = writer.by(Note(Actor("system"), "team_id_upsert"))
        self.user_writer = writer.by(Note(Actor("system"), "user_id_upsert"))

    async def team(self, team_id: str) -> TeamRecord:
        doc = new_team_doc(team_id, models=[NO_DEFAULT_MODELS], metadata={"created_by": "team_id_upsert"})
        await self.team_writer.create_team(doc, exists_ok=True)
        stored = await self.team_writer.team_doc(team_id)  # another replica may have created it first
        return TeamRecord.from_document(stored or doc)

    async def user(self, user_id: str, email: str | None) -> None:
        if await self.reader.get_user(user_id) is not None:
            return
        await self.user_writer.create_user(new_user_doc(user_id, user_email=email, user_role="internal_user_viewer",
                                                   metadata={"created_by": "user_id_upsert"}), exists_ok=True)
