"""Delivery of outgoing events (the dispatcher). Not ``api.webhooks``, which *receives* model
webhooks; the events themselves, their endpoints and the outbox are ``auth.events``."""
