"""api/grpc/protocol/ holds the Open Inference Protocol's own .proto and the code grpcio-tools
generates from it, committed so that an install needs no code generator. The code is never
edited: regenerated here with the pinned grpcio-tools (pyproject.toml's dev extra), it must be
the committed code, byte for byte.

The generated module is not imported here: it registers ``inference.*`` in protobuf's
process-wide pool, as tritonclient's copy (which the e2e tests import) does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = Path("api/grpc/protocol")
PROTO = PROTOCOL / "open_inference_grpc.proto"
GENERATED = (
    "open_inference_grpc_pb2.py",
    "open_inference_grpc_pb2.pyi",
    "open_inference_grpc_pb2_grpc.py",
)


def generate(root: Path) -> None:
    """Compile ``root``'s copy of the .proto in place, as the committed code was compiled
    (``python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=.`` from
    the repository's root)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            str(PROTO),
        ],
        cwd=root,
        check=True,
        capture_output=True,
    )


def test_the_committed_grpc_code_is_what_the_proto_generates(tmp_path: Path) -> None:
    (tmp_path / PROTOCOL).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    generate(tmp_path)
    for name in GENERATED:
        committed = (ROOT / PROTOCOL / name).read_bytes()
        assert (tmp_path / PROTOCOL / name).read_bytes() == committed, (
            f"{PROTOCOL / name} differs from what {PROTO} generates: regenerate it "
            "(tests/test_grpc_generated.py says how), never edit it"
        )


def test_the_proto_is_the_protocols() -> None:
    text = (ROOT / PROTO).read_text()
    assert "package inference;" in text
    assert "service GRPCInferenceService" in text
    for method in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ):
        assert f"rpc {method}(" in text
