"""Running the API: the uvicorn supervisor and each worker's model-activation follower."""
