"""Signed webhooks that announce new model versions: who sent a delivery (its signature and
timestamp, ``signatures``) and whether its id was seen before (``deliveries``)."""
