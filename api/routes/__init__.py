"""The URL surface: one module per resource; ``admin/`` holds the operator routes."""
