"""Real chat templates, kept verbatim in tests/templates/ (nothing can be downloaded in the tests).

LLAMA_3_1: the `chat_template` of meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json.
QWEN_2_5: the `chat_template` of Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json (the same for every
Qwen2.5 Instruct size).
"""

from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
LLAMA_3_1 = (TEMPLATES / "llama-3.1-instruct.jinja").read_text()
QWEN_2_5 = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
