"""The Protocol Buffers definitions shipped with the package (``llm_latency_lens/v1/measurement.proto``) and the
Python module protoc generates from them. :data:`PROTO_DIR` is the directory to give protoc as ``--proto_path``;
it needs no protobuf runtime::

    python -c "import lens_core.proto as p; print(p.PROTO_DIR)"
"""

from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent  # protoc --proto_path (the .proto: PROTO_DIR / PROTO_FILE)
PROTO_FILE = "llm_latency_lens/v1/measurement.proto"
