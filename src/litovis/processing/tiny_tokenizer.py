"""A tiny, deterministic Qwen-style tokenizer for tests and the CPU demo (`tiny` preset, vocab 512).

Byte-level BPE trained with the `tokenizers` library on a small English corpus embedded below,
with Qwen2's pre-tokenization (its split regex, NFC normalization) and Qwen's chat tokens added at
the end of the vocabulary, as in the real tokenizer: `<|endoftext|>` (pad), `<|im_start|>`,
`<|im_end|>` (eos) as special tokens, `<think>` and `</think>` as ordinary added tokens. Byte-level
means any text encodes (no unknown token). Training is single-pass and tie-broken by the library's
deterministic order, so every build yields the same ids.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from litovis.processing.chat import END_OF_TEXT, IM_END, IM_START, THINK_END, THINK_START

SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
THINK_TOKENS = (THINK_START, THINK_END)

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single
# digits, punctuation runs, newline runs, other whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = (
    """The user shows the assistant an image of a small harbour at sunrise. Three fishing boats
rest near the wooden pier, and a red lighthouse stands on the rocks to the left. The water is calm,
the sky is pale orange, and a few gulls circle above the masts. Describe what you see in the picture.""",
    """A caption should be short and concrete: name the main objects, their colours and where they
are. A good answer to a question about an image points to the evidence in the image itself. When the
question asks for a number, count carefully and give the number first, then explain the reasoning.""",
    """Summarization turns a long passage into a few sentences that keep the important facts. The
summary must not add information that the passage does not contain. Read the whole text, find the
main idea, list the supporting details, and then write the summary in plain and simple language.""",
    """To solve the math problem, first write down what is known. If a train travels 120 kilometres
in 2 hours, its average speed is 60 kilometres per hour. Check the units, check the arithmetic, and
state the final answer clearly. Let me think step by step before I answer the question.""",
    """System: you are a helpful assistant that answers questions about documents, charts, tables
and photographs. Assistant: the chart shows sales for each month of the year; the highest value is in
December and the lowest value is in February. User: thank you, what is the total for the year?""",
    """Reading comprehension questions are answered from the passage. Find the sentence that holds
the answer, copy the exact words when the question asks for a span, and say that the answer is not in
the passage when it cannot be found there. Numbers such as 1, 2, 3, 4, 5, 6, 7, 8, 9 and 0 matter.""",
)


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer; its vocabulary has exactly `vocab_size` ids.

    The last five ids are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<think>`, `</think>`.

    Raises:
        ValueError: if `vocab_size` is below the 256 byte symbols plus the 5 added tokens, or more
            than the embedded corpus can supply merges for.
    """
    added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + added:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + added}, got {vocab_size}")

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added,
        initial_alphabet=alphabet,
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(list(CORPUS), trainer=trainer)
    learned = backend.get_vocab_size()
    if learned != vocab_size - added:
        raise ValueError(
            f"the embedded corpus yields only {learned + added} ids, fewer than vocab_size={vocab_size}"
        )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
