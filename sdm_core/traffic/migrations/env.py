"""Alembic environment: migrations run on the connection :func:`sdm_core.traffic.store.migrate` hands over
(``config.attributes["connection"]``); there is no alembic.ini and no logging setup, so a server's logging is
left alone."""

from __future__ import annotations

from alembic import context

from sdm_core.traffic.schema import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the traffic store's migrations run through sdm_core.traffic.TrafficStore.migrate(), not the alembic CLI"
    )
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
