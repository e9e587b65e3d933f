"""Plans, the per-key rate limiter and the concurrency limit."""
