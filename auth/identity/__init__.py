"""Identity: API keys, JWTs, admin users, the credential check and its cache, failed-login
throttling, and keys' last use."""
