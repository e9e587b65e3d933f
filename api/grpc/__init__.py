"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), served when
``MODELGATE_GRPC_PORT`` is set (``api.server.grpc_serving``)."""
