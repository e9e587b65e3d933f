"""HTTP plumbing: request context, middleware, deadline, body limit, client address, problem
JSON, OpenAPI, dependencies and route classes."""
