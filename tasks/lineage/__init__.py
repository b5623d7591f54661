"""Lineage: the one MLflow wing (client, tags, outbox, publishing of every step, the lineage graph)."""
