"""The committed gRPC stubs are exactly what protoc generates from protos/ (a stale stub fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "gemma4_platform/api/v1/serving.proto"
GENERATED = ("serving_pb2.py", "serving_pb2.pyi", "serving_pb2_grpc.py")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stubs protoc writes now, with the command that generated the committed ones (into a tmp dir)."""
    out = tmp_path_factory.mktemp("stubs")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "protos" / PROTO),
    ]
    assert protoc.main(args) == 0, "protoc failed on the serving proto"
    return out / Path(PROTO).parent


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stub_is_current(regenerated: Path, name: str) -> None:
    committed = ROOT / "platform" / Path(PROTO).parent / name
    assert committed.read_bytes() == (regenerated / name).read_bytes(), (
        f"{committed.relative_to(ROOT)} is stale: regenerate with `python -m grpc_tools.protoc -I protos "
        f"--python_out=platform --pyi_out=platform --grpc_python_out=platform protos/{PROTO}`"
    )
