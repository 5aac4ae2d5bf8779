"""Generate the Python gRPC code of shared/proto/saguaro.proto with grpc_tools.protoc.

Usage: python scripts/gen_proto.py [--out-dir DIR]

The proto is compiled with the repository root as include path, so the
generated modules import each other as ``shared.proto.saguaro_pb2``. With
``--out-dir`` the files are written under DIR/shared/proto/ instead of in
place, which the tests use to check that the committed files are current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILE = "shared/proto/saguaro.proto"
GENERATED_FILES = ("saguaro_pb2.py", "saguaro_pb2.pyi", "saguaro_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on the proto and return the paths of the generated files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    arguments = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(REPO_ROOT / PROTO_FILE),
    ]
    status = protoc.main(arguments)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status} on {PROTO_FILE}")
    return [out_dir / "shared" / "proto" / name for name in GENERATED_FILES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT, help="root under which shared/proto/ is written (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
