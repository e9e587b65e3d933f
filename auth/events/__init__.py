"""Outgoing events: what modelgate tells tenants and operators, signed as Standard Webhooks.

Not the *incoming* model webhooks of ``auth.webhooks`` / ``api.webhooks`` (MLflow and generic
receivers that deploy models). Here: event endpoints (``endpoints``), their signing secrets
(``secrets``), the transactional outbox (``outbox``), the address guard (``targets``) and the
dispatcher that delivers (``dispatcher``)."""
