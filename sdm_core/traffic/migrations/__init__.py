"""Alembic migrations of the traffic store (run by :meth:`sdm_core.traffic.TrafficStore.migrate`)."""
