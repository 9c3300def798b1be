"""Write a tiny GGUF model of tests/tinymodel.py as a Hugging Face checkpoint, for vLLM to serve.

    .venv-vllm/bin/python tests/vllm/convert.py MODEL.gguf OUTDIR

Runs with the vLLM environment's Python (transformers reads the GGUF; see tests/vllm_server.py).
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # weights read from GGUF are marked as "GGUF-quantized" and refused by save_pretrained; they are plain f32 here
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.save_pretrained(str(out))
    model.save_pretrained(str(out))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: .venv-vllm/bin/python tests/vllm/convert.py MODEL.gguf OUTDIR")
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
