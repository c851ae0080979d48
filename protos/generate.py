"""Generate the Python code of the wire API: `python -m kubellm.protos.generate [--check]`.

Writes protos/v1/llm_pb2.py, llm_pb2.pyi and llm_pb2_grpc.py (importable as
`kubellm.protos.v1`) from protos/kubellm/v1/llm.proto. `--check` exits 1 when they are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "kubellm/v1/llm.proto"
OUT = HERE / "v1"
FILES = ("llm_pb2.py", "llm_pb2.pyi", "llm_pb2_grpc.py")


def generate(target: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                            f"--grpc_python_out={tmp}", str(HERE / PROTO)])
        if code != 0:
            raise SystemExit(f"protoc failed ({code})")
        for name in FILES:
            text = (Path(tmp) / "kubellm" / "v1" / name).read_text()
            # protoc writes absolute imports of the proto package; ours lives at kubellm.protos.v1.
            text = text.replace("from kubellm.v1 import llm_pb2", "from kubellm.protos.v1 import llm_pb2")
            (target / name).write_text(text)


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            stale = [n for n in FILES if (Path(tmp) / n).read_text() != (OUT / n).read_text()]
        if stale:
            print(f"stale: {', '.join(stale)}; run: python -m kubellm.protos.generate", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    generate(OUT)
    print(f"wrote {', '.join(FILES)} in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
