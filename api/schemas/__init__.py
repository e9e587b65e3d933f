"""Request and response shapes, and the bounded field types clients send."""
