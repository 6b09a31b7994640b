"""The demo base model's tokenizer: byte-level BPE trained on the demo corpus and the prompt formats.

Built by `qlora.demo.pretrain` with the `tokenizers` library and saved next to the model; `qlora train`
only loads the saved `tokenizer.json` through transformers.

Every word carries its leading space, also at the start of the text and of a line: the normalizer puts a
space after each newline and in front of the text (unless it starts with a newline), and the decoder
takes exactly those spaces out again, so decoding is lossless (special tokens kept in the decoded text
are followed by a space, as with Llama's SentencePiece tokenizers). Without that, "mouse" after
"### Input:\\n" would be a different token from " mouse" inside a pretraining sentence, and a model this
small could not connect the two: the fine-tune could not reach what the base knows about the word.
(Making each space its own token fixes that too, but costs ~40% more tokens and puts a space between
every two words the model has to relate.) Byte-level means any text still encodes.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qlora.data.prepare import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)

# The prompt formats the demo fine-tunes on: the trainer's own Alpaca templates with the slots taken out, and
# the chat template's roles below. They are tokenizer training text only: the base model never sees them
# during pretraining.
PROMPT_TEXTS = (
    ALPACA_PROMPT.replace("{instruction}\n", "").replace("{input}\n", ""),
    ALPACA_PROMPT_NO_INPUT.replace("{instruction}\n", ""),
    "### System:\n\n### User:\n\n### Assistant:\n",
)

# Plain "### Role:" blocks like the Alpaca template, after the bos token (chat text is tokenized without
# special tokens, so the template writes it); the assistant turn ends with the eos token so a fine-tuned
# model learns to stop. No {% generation %} markers: masking is the trainer's job.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over `texts` (plus the prompt formats), wrapped for transformers."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("\n", "\n "),
            normalizers.Prepend(" "),
            normalizers.Replace(Regex(r"\A \n"), "\n"),  # no space in front of a leading newline
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.Sequence(
        [
            decoders.ByteLevel(),
            decoders.Replace("\n ", "\n"),
            decoders.Strip(" ", left=1, right=0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Repeating the prompt formats makes their words whole tokens, which keeps fine-tuning sequences short.
    tok.train_from_iterator(_with_prompts(texts), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def _with_prompts(texts: Iterable[str], repeats: int = 200) -> Iterable[str]:
    """The training texts followed by the prompt formats, repeated so BPE merges their words."""
    yield from texts
    for _ in range(repeats):
        yield from PROMPT_TEXTS
